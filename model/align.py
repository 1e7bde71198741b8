"""Alignment of a query's chroma sequence against references: Qmax scores for a shortlist in
one pass, and for the tracks returned, where they match, at what tempo and in what key.

The scores are those of `refrain.model.qmax` (Serrà et al. 2009: OTI key alignment, a
mutual-nearest-neighbour cross-recurrence plot, the Qmax local alignment with knight moves
and gap penalties) and equal librosa's ``rqa`` cell for cell (tests/test_align.py). The
service scores a query against its C shortlisted references at once, so the recursion runs
row by row over the query's frames with the references' plots side by side in one array:
every cell of a row depends only on the two rows above it. Two zero rows on top and two
zero columns before each reference stand in for the kernel's first-row and first-column
cases, and keep paths from crossing from one reference into the next. A 30 s query (60
frames) against 50 references of 4 minutes is 60 numpy passes over 24,000 cells. The plots
are made a stage at a time over all references (`refrain.model.shortlist`: one call per
stage, not one per pair), and a long shortlist is split into ranges of references aligned
on separate threads (`shortlist.threads`), each range's plots and recursion in its own
columns; the values are the pair-by-pair path's, cell for cell.

`locate` then reads the best paths of one reference back out of its score matrix (up to
`max_matches`, each found after masking the cells of the ones before), fits the path's
line by least squares (its slope is the tempo ratio: reference seconds per query second),
and refines slope and offset on the query's fine chroma (`FINE_RATE` frames per second):
the query is pooled into the reference's frames under each (ratio, offset) hypothesis near
the fit, and the hypothesis whose frames agree best (cosine, in the OTI key) is kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np

from . import shortlist
from .qmax import (
    QmaxParams,
    _unit,
    delay_embed,
    mutual_neighbours,
    one_blas_thread,
)
from .sequence import BINS, FINE_RATE

P = ParamSpec("P")
R = TypeVar("R")

_RATIO_SPAN = 0.06  # refinement searches ratios within +-6 % of the path's fit ...
_OFFSET_SPAN_S = 1.0  # ... and offsets within +-1 s of it
# a match is clear when its Qmax reaches this per query frame (random pairs stay below):
# only a clear best match is refined, and only a clear one is followed by further matches
_REFINE_LINKED = 0.4
KEYS = 3  # transpositions aligned per returned track: the best by local profile fit ...
ONE_KEY_S = 20.0  # ... for queries shorter than this; a longer one's best fit is reliable
_EDGE_S = 0.5  # query seconds at each end left out of the refinement's agreement
_MIN_PATH = 4  # frames a match's path must link to be reported


@dataclass(frozen=True)
class Alignment:
    """One place where a query matches a reference."""

    query_start_s: float
    query_end_s: float
    ref_start_s: float
    ref_end_s: float
    tempo_ratio: float  # reference seconds per query second (1.1: the query plays slower)
    key_shift: int  # semitones the query was shifted by to match, in -5..6
    score: float  # Qmax of the path: linked frames less gap penalties


@dataclass
class Plots:
    """Qmax score matrices of one query against several references, side by side."""

    score: np.ndarray  # (n + 2, total) float32; rows 0-1 and each block's 2 columns are zero
    recurrence: np.ndarray  # (n + 2, total) bool, laid out like `score`
    starts: np.ndarray  # (C,) first column of each reference's block
    widths: np.ndarray  # (C,) frames of each reference
    shifts: np.ndarray  # (C,) OTI of each pair (np.roll of the query's pitch axis)
    params: QmaxParams
    query: np.ndarray  # (n, 12) the query's chroma

    def block(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        a, w = int(self.starts[c]), int(self.widths[c])
        return self.score[2:, a : a + w], self.recurrence[2:, a : a + w]

    def qmax(self) -> np.ndarray:
        return np.array([float(self.block(c)[0].max()) for c in range(len(self.starts))])


def _fill(
    rec: np.ndarray, score: np.ndarray, sep: np.ndarray, gap_onset: float, gap_extend: float
) -> np.ndarray:
    """Qmax scores of a padded plot, row by row, in place in `score` (zeros): cell (i, j)
    extends the best of (i-1, j-1), (i-1, j-2), (i-2, j-1) by one where the plot links, or
    else decays it by the gap penalty of the cell it leaves (onset if that one linked).

    Each row's decayed scores (score less the cell's penalty) are kept beside it, computed
    once per cell rather than once per successor, and the separator columns are zeroed by
    index. A linked cell's extension is taken as (best + 1) times the link (0 or 1) and then
    the larger of it and the decays: a decay is below its cell's score, so where the plot
    links the extension wins, and elsewhere the product is the floor of 0. No pass is
    masked (a masked ufunc runs several times slower); the values are those of the
    recursion as specified (tests/test_verify_speed.py).
    """
    pen = np.where(rec, np.float32(gap_onset), np.float32(gap_extend))
    link = rec.astype(np.float32)
    dec = np.empty(rec.shape, np.float32)
    np.subtract(score[:2], pen[:2], out=dec[:2])
    cut = np.flatnonzero(sep[2:]) + 2  # separator columns after the first two: zero in every row
    best = np.empty(rec.shape[1] - 2, np.float32)
    for i in range(2, rec.shape[0]):
        row = score[i, 2:]
        np.maximum(score[i - 1, 1:-1], score[i - 1, :-2], out=best)
        np.maximum(best, score[i - 2, 1:-1], out=best)
        np.add(best, 1, out=best)
        np.multiply(best, link[i, 2:], out=best)
        np.maximum(dec[i - 1, 1:-1], dec[i - 1, :-2], out=row)
        np.maximum(row, dec[i - 2, 1:-1], out=row)
        np.maximum(row, best, out=row)
        score[i, cut] = 0
        np.subtract(score[i], pen[i], out=dec[i])
    return score


def _one_blas_thread_each_call(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run with one BLAS thread (`qmax.one_blas_thread`): the entry points' products
    are small."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with one_blas_thread():
            return fn(*args, **kwargs)

    return call


@_one_blas_thread_each_call
def plots(
    query: np.ndarray,
    refs: Sequence[np.ndarray],
    params: QmaxParams | None = None,
    shifts: np.ndarray | None = None,
) -> Plots:
    """Cross-recurrence plots and Qmax scores of query chroma (n, 12) against reference chroma
    sequences (m_c, 12), all at `params.frame_rate`, the query transposed by each pair's
    local OTI (`local_oti`), or by `shifts`, one per reference."""
    p = params or QmaxParams()
    query = np.asarray(query, dtype=np.float32)
    refs = [np.asarray(r, dtype=np.float32) for r in refs]
    if len(refs) == 0:
        empty = np.zeros((len(query) + 2, 0))
        starts, widths, shifts = (np.zeros(0, np.int64) for _ in range(3))
        return Plots(empty, empty.astype(bool), starts, widths, shifts, p, query)
    widths = np.array([len(r) for r in refs], dtype=np.int64)
    starts = 2 + np.concatenate([[0], np.cumsum(widths + 2)[:-1]])
    total = int(starts[-1] + widths[-1])
    rec = np.zeros((len(query) + 2, total), dtype=bool)
    score = np.zeros(rec.shape, np.float32)
    out_shifts = np.zeros(len(refs), np.int64)
    sep = np.ones(total, dtype=bool)
    for a, w in zip(starts.tolist(), widths.tolist(), strict=True):
        sep[a : a + w] = False

    def chunk(lo: int, hi: int) -> None:
        """Candidates lo..hi-1: their keys, plots and scores, in their own columns."""
        stacked, w = shortlist.padded(refs[lo:hi])
        keys = shortlist.best_keys(query, stacked, w) if shifts is None else shifts[lo:hi]
        out_shifts[lo:hi] = keys
        rolled = {
            int(k): _unit(delay_embed(np.roll(query, k, axis=1), p.m, p.tau))
            for k in np.unique(keys)
        }
        states = shortlist.delay_states(stacked, p.m, p.tau)
        plot = shortlist.neighbour_plots(rolled, states, w, out_shifts[lo:hi], p.kappa)
        for c in range(lo, hi):
            a = int(starts[c])
            rec[2:, a : a + int(widths[c])] = plot[c - lo, :, : widths[c]]
        # the chunk's columns and the two separator columns before them (zero)
        a, b = int(starts[lo]) - 2, int(starts[hi - 1] + widths[hi - 1])
        _fill(rec[:, a:b], score[:, a:b], sep[a:b], p.gap_onset, p.gap_extend)

    shortlist.run_chunks(chunk, widths, len(query))
    shifts = out_shifts
    return Plots(score, rec, starts, widths, shifts, p, query)


def local_oti(query: np.ndarray, ref: np.ndarray) -> int:
    """The transposition (np.roll of the query's pitch axis) that best matches the query's
    chroma profile to the profile of some stretch of the reference as long as the query.

    OTI (Serrà et al.) compares global profiles; a clip's profile is that of a few bars,
    which a whole track's can differ from, so each window of the reference is compared and
    the best (window, key) pair decides. For a query as long as the reference this is OTI."""
    return int(np.argmax(_key_fit(query, ref)))


def _key_fit(query: np.ndarray, ref: np.ndarray, rolled: np.ndarray | None = None) -> np.ndarray:
    """(12,) per transposition, the best cosine between the rolled query profile and the
    profile of a stretch of the reference as long as the query (`rolled`: the query's
    profile in the 12 keys, when already known)."""
    n = min(len(query), len(ref))
    cum = np.concatenate([np.zeros((1, BINS), np.float32), np.cumsum(ref, 0)])
    windows = _unit(cum[n:] - cum[:-n])  # (m - n + 1, 12)
    if rolled is None:
        rolled = shortlist.rolled_profiles(query)
    return (windows @ rolled.T).max(0)


def _backtrack(score: np.ndarray, rec: np.ndarray, end: tuple[int, int]) -> list[tuple[int, int]]:
    """The linked cells of the best path ending at `end`, first to last, walking back to
    the predecessor with the highest score (diagonal first on ties) until the score runs
    out. `score` and `rec` are one block without padding."""
    i, j = end
    path = []
    while i >= 0 and j >= 0 and score[i, j] > 0:
        if rec[i, j]:
            path.append((i, j))
        steps = [(i - 1, j - 1), (i - 1, j - 2), (i - 2, j - 1)]
        steps = [(a, b) for a, b in steps if a >= 0 and b >= 0]
        if not steps:
            break
        i, j = max(steps, key=lambda s: score[s])
    return path[::-1]


def _refine(
    fine: np.ndarray, ref: np.ndarray, shift: int, ratio: float, offset: float, rate: float
) -> tuple[float, float]:
    """(ratio, offset) near the fit whose query frames, pooled into the reference's frames
    (`rate` per second) from `fine` chroma (`FINE_RATE` per second) and rolled by `shift`,
    best agree with the reference: ref_time = offset + ratio * query_time. A coarse grid
    over +-6 % and +-1 s, then a finer one (0.5 %, 1/16 s) around its best."""
    q = _unit(np.roll(fine, shift, axis=1))
    cum = np.concatenate([np.zeros((1, BINS)), np.cumsum(q, 0)])
    ref_unit = _unit(ref)
    grids = (  # (ratio step, ratio span, offset step, offset span): coarse, then fine
        (0.02, _RATIO_SPAN, 0.25, _OFFSET_SPAN_S),
        (0.005, 0.02, 0.0625, 0.25),
    )
    for step_r, span_r, step_o, span_o in grids:
        ratios = ratio * (1 + np.arange(-span_r, span_r + 1e-9, step_r))
        offsets = offset + np.arange(-span_o, span_o + 1e-9, step_o)
        ratio, offset = _best_hypothesis(cum, ref_unit, ratios, offsets, rate, (ratio, offset))
    return ratio, offset


def _best_hypothesis(
    cum: np.ndarray,
    ref_unit: np.ndarray,
    ratios: np.ndarray,
    offsets: np.ndarray,
    rate: float,
    default: tuple[float, float],
) -> tuple[float, float]:
    """The (ratio, offset) of the grid whose pooled query frames agree best (mean cosine)
    with the reference frames they cover; all hypotheses at once, (H, J) windows of the
    query's cumulative chroma `cum`."""
    n_fine = len(cum) - 1
    rr, oo = (a.ravel() for a in np.meshgrid(ratios, offsets, indexing="ij"))
    j_lo = max(0, math.floor(offsets.min() * rate))
    j_hi = min(len(ref_unit), math.ceil((offsets.max() + ratios.max() * n_fine / FINE_RATE) * rate))
    if j_hi - j_lo < 2:
        return default
    j = np.arange(j_lo, j_hi + 1)
    # fine-frame edges of each reference frame under each hypothesis: (H, J + 1)
    edges = np.round((j[None, :] / rate - oo[:, None]) / rr[:, None] * FINE_RATE)
    # frames whose window lies inside the query, clear of its edges (where the CQT sees the
    # clip's cut): otherwise hypotheses that leave the edges out would look better
    margin = min(_EDGE_S * FINE_RATE, n_fine / 4)
    inside = (edges[:, :-1] >= margin) & (edges[:, 1:] <= n_fine - margin)
    e = np.clip(edges, 0, n_fine).astype(np.int64)
    pooled = _unit(cum[e[:, 1:]] - cum[e[:, :-1]])  # (H, J, 12)
    ref_frames = np.broadcast_to(ref_unit[j_lo:j_hi], pooled.shape)
    # centred on each side's mean over the frames compared, so that what agrees is how the
    # chroma changes over time, not the key's overall profile (which every offset shares)
    count = inside.sum(1)
    w = inside[..., None] / np.maximum(count, 1)[:, None, None]
    a = _unit(pooled - (pooled * w).sum(1, keepdims=True))
    b = _unit(ref_frames - (ref_frames * w).sum(1, keepdims=True))
    agree = np.einsum("hjb,hjb->hj", a, b)
    mean = np.where(count > 0, (agree * inside).sum(1) / np.maximum(count, 1), -np.inf)
    mean[count < 0.8 * count.max()] = -np.inf
    best = int(np.argmax(mean))
    return float(rr[best]), float(oo[best])


@_one_blas_thread_each_call
def locate(
    query: np.ndarray,
    fine: np.ndarray | None,
    refs: Sequence[np.ndarray],
    max_matches: int,
    rate: float,
    query_s: float,
    ref_s: Sequence[float | None] | None = None,
    params: QmaxParams | None = None,
    aligned: Sequence[tuple[np.ndarray, np.ndarray, int] | None] | None = None,
) -> list[list[Alignment]]:
    """Per reference, up to `max_matches` places where the query matches it, best first.

    A short clip's global chroma can mislead OTI, so a query shorter than `ONE_KEY_S` is
    aligned in the `KEYS` transpositions that best fit some stretch of the reference (all
    references x keys side by side, one pass) and the key with the highest Qmax kept, the
    smallest shift among equals. `fine` is the query's chroma at `FINE_RATE` (None: no
    refinement); `query_s` and `ref_s` bound the ranges. `aligned`, per reference, is its
    (score, recurrence, shift) block from `plots` in its best-fit key (the verification's):
    that block is used as it is for a longer query, or where its match is already clear."""
    p = params or QmaxParams()
    if not refs:
        return []
    query = np.asarray(query, dtype=np.float32)
    refs = [np.asarray(r, dtype=np.float32) for r in refs]
    clear = _REFINE_LINKED * len(query)
    one_key = len(query) / p.frame_rate >= ONE_KEY_S
    blocks: list[tuple[np.ndarray, np.ndarray, int] | None] = [
        None if a is None or not (one_key or a[0].max() >= clear) else a
        for a in (aligned if aligned is not None else [None] * len(refs))
    ]
    todo = [c for c, b in enumerate(blocks) if b is None]
    if todo:
        keyed, shifts = _key_plots(query, [refs[c] for c in todo], p, 1 if one_key else KEYS)
        keys = shifts.shape[1]
        qmaxes = keyed.qmax().reshape(len(todo), keys)
        for k, c in enumerate(todo):
            q, s = qmaxes[k], shifts[k]
            # the highest Qmax; among equals the smallest transposition (most versions keep
            # their key)
            r = int(min(np.flatnonzero(q == q.max()), key=lambda r: (abs((s[r] + 5) % 12 - 5), r)))
            score, rec = keyed.block(k * keys + r)
            blocks[c] = (score, rec, int(s[r]))
    out = []
    for c, ref in enumerate(refs):
        block = blocks[c]
        assert block is not None  # every block left empty above was filled in
        score, rec, shift = block
        given = ref_s[c] if ref_s is not None else None
        duration = given if given else len(ref) / rate
        out.append(
            _matches(
                score.copy(), rec.copy(), ref, fine, shift, max_matches, rate, query_s, duration, p
            )
        )
    return out


def _key_plots(
    query: np.ndarray, refs: Sequence[np.ndarray], p: QmaxParams, keys: int = KEYS
) -> tuple[Plots, np.ndarray]:
    """Plots of the query in each reference's `keys` best keys by local profile fit
    (`local_oti`'s ranking): block c * keys + r holds reference c against the query rolled
    by `shifts[c, r]`, which is returned."""
    rolled = np.stack(
        [_unit(delay_embed(np.roll(query, k, axis=1), p.m, p.tau)) for k in range(BINS)]
    )
    profiles = shortlist.rolled_profiles(query)
    shifts = np.stack([_key_fit(query, r, profiles).argsort()[::-1][:keys] for r in refs])
    widths = np.repeat([len(r) for r in refs], keys).astype(np.int64)
    starts = 2 + np.concatenate([[0], np.cumsum(widths + 2)[:-1]])
    total = int(starts[-1] + widths[-1])
    rec = np.zeros((len(query) + 2, total), dtype=bool)
    sep = np.ones(total, dtype=bool)
    for c, r in enumerate(refs):
        sims = rolled[shifts[c]] @ _unit(delay_embed(r, p.m, p.tau)).T
        plots_c = mutual_neighbours(sims, p.kappa)
        for k in range(keys):
            a = starts[c * keys + k]
            rec[2:, a : a + len(r)] = plots_c[k]
            sep[a : a + len(r)] = False
    score = _fill(rec, np.zeros(rec.shape, np.float32), sep, p.gap_onset, p.gap_extend)
    return Plots(score, rec, starts, widths, shifts.ravel(), p, query), shifts


def _matches(
    score: np.ndarray,
    rec: np.ndarray,
    ref: np.ndarray,
    fine: np.ndarray | None,
    shift: int,
    max_matches: int,
    rate: float,
    query_s: float,
    ref_s: float,
    p: QmaxParams,
) -> list[Alignment]:
    """The best paths of one block, each found after masking the reference span of the ones
    before, fitted and refined into alignments."""
    context = (p.m - 1) * p.tau  # frames before a state that it also holds
    out: list[Alignment] = []
    for _ in range(max_matches):
        row, col = np.unravel_index(int(np.argmax(score)), score.shape)
        end = (int(row), int(col))
        best = float(score[end])
        path = _backtrack(score, rec, end) if best > 0 else []
        if len(path) < _MIN_PATH or (out and best < 0.5 * out[0].score):
            break
        i, j = np.array(path, dtype=np.float64).T
        ratio, offset = _fit(i, j, rate)
        # the best match only, and only a clear one (Qmax of random pairs stays below)
        if fine is not None and len(fine) >= 4 and not out and best >= _REFINE_LINKED * len(rec):
            ratio, offset = _refine(fine, ref, shift, ratio, offset, rate)
        q0 = max(0.0, (i[0] - context) / rate)
        q1 = min((i[-1] + 1) / rate, query_s)
        out.append(
            Alignment(
                query_start_s=round(float(q0), 2),
                query_end_s=round(float(q1), 2),
                ref_start_s=round(float(np.clip(offset + ratio * q0, 0, ref_s)), 2),
                ref_end_s=round(float(np.clip(offset + ratio * q1, 0, ref_s)), 2),
                tempo_ratio=round(ratio, 4),
                key_shift=int((shift + 5) % 12 - 5),
                score=best,
            )
        )
        if best < _REFINE_LINKED * len(rec):
            break  # no clear match: its further paths would be noise
        lo, hi = int(j.min()), int(j.max()) + 1
        rec[:, lo:hi] = False  # mask this match's reference span: the next one is elsewhere
        score = _fill_block(rec, p)
    return out


def _fill_block(rec: np.ndarray, p: QmaxParams) -> np.ndarray:
    """Qmax scores of one unpadded block."""
    padded = np.zeros((rec.shape[0] + 2, rec.shape[1] + 2), dtype=bool)
    padded[2:, 2:] = rec
    sep = np.zeros(padded.shape[1], dtype=bool)
    sep[:2] = True
    score = _fill(padded, np.zeros(padded.shape, np.float32), sep, p.gap_onset, p.gap_extend)
    return score[2:, 2:]


def _fit(i: np.ndarray, j: np.ndarray, rate: float) -> tuple[float, float]:
    """Least-squares line ref = offset + ratio * query (seconds) through a path's cells,
    each taken at its frame's centre; the ratio kept within the knight moves' 0.5..2."""
    x, y = (i + 0.5) / rate, (j + 0.5) / rate
    dx = x - x.mean()
    spread = float(dx @ dx)
    ratio = float(np.clip((dx @ (y - y.mean())) / spread, 0.5, 2.0)) if spread > 0 else 1.0
    return ratio, float(np.mean(y - ratio * x))
