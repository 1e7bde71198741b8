"""The batched verification (`refrain.model.align.plots` over `refrain.model.shortlist`)
against its specification, the pair-by-pair path it replaced: on seeded shortlists the same
keys, plots and Qmax scores, cell for cell, so the verified ranking cannot move."""

from __future__ import annotations

import numpy as np
import pytest

from refrain.model import align
from refrain.model.qmax import QmaxParams, _unit, cross_recurrence, delay_embed
from refrain.model.sequence import UPPER


def reference_fill(
    rec: np.ndarray, score: np.ndarray, sep: np.ndarray, gap_onset: float, gap_extend: float
) -> np.ndarray:
    """The Qmax recursion of a padded plot row by row in numpy, as it was specified."""
    pen = np.where(rec, np.float32(gap_onset), np.float32(gap_extend))
    dec = np.empty(rec.shape, np.float32)
    np.subtract(score[:2], pen[:2], out=dec[:2])
    cut = np.flatnonzero(sep[2:]) + 2
    best = np.empty(rec.shape[1] - 2, np.float32)
    for i in range(2, rec.shape[0]):
        row = score[i, 2:]
        np.maximum(score[i - 1, 1:-1], score[i - 1, :-2], out=best)
        np.maximum(best, score[i - 2, 1:-1], out=best)
        np.maximum(dec[i - 1, 1:-1], dec[i - 1, :-2], out=row)
        np.maximum(row, dec[i - 2, 1:-1], out=row)
        np.maximum(row, 0, out=row)
        np.add(best, 1, out=row, where=rec[i, 2:])
        score[i, cut] = 0
        np.subtract(score[i], pen[i], out=dec[i])
    return score


def reference_plots(
    query: np.ndarray, refs: list[np.ndarray], p: QmaxParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair by pair: each reference's local OTI, states and plot, then the recursion.
    Returns (shifts, padded plot, scores) laid out as `align.Plots`."""
    query = np.asarray(query, dtype=np.float32)
    shifts = np.array([align.local_oti(query, r) for r in refs], np.int64)
    widths = np.array([len(r) for r in refs], dtype=np.int64)
    starts = 2 + np.concatenate([[0], np.cumsum(widths + 2)[:-1]])
    rec = np.zeros((len(query) + 2, int(starts[-1] + widths[-1])), dtype=bool)
    sep = np.ones(rec.shape[1], dtype=bool)
    for c, r in enumerate(refs):
        rolled = _unit(delay_embed(np.roll(query, int(shifts[c]), axis=1), p.m, p.tau))
        states = _unit(delay_embed(r, p.m, p.tau))
        a = starts[c]
        rec[2:, a : a + len(r)] = cross_recurrence(rolled, states, p.kappa)
        sep[a : a + len(r)] = False
    score = reference_fill(rec, np.zeros(rec.shape, np.float32), sep, p.gap_onset, p.gap_extend)
    return shifts, rec, score


def walk(rng: np.random.Generator, n: int) -> np.ndarray:
    """A quantised chroma sequence that changes slowly, as stored sequences do."""
    x = np.abs(np.cumsum(rng.standard_normal((n, 12)) * 0.4, axis=0)) + rng.random((n, 12))
    return (np.round(x / x.max(1, keepdims=True) * 255) / 255).astype(np.float32)


@pytest.mark.parametrize("params", [QmaxParams(), UPPER])
@pytest.mark.parametrize("seed", range(4))
def test_batched_plots_equal_the_pairwise_specification(seed: int, params: QmaxParams):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([3, 20, 60]))
    refs = [walk(rng, int(rng.integers(2, 300))) for _ in range(40)]
    query = walk(rng, n)
    # versions of the query inside some references, transposed
    for c in rng.choice(len(refs), 5, replace=False):
        at = int(rng.integers(0, len(refs[c]) + 1))
        refs[c] = np.concatenate(
            [refs[c][:at], np.roll(query, int(rng.integers(12)), axis=1), refs[c][at:]]
        )
    refs[7] = np.zeros((30, 12), np.float32)  # silence: ties everywhere
    refs[8] = np.repeat(refs[8][:1], 40, axis=0)  # one frame held: ties along each row
    shifts, rec, score = reference_plots(query, refs, params)
    got = align.plots(query, refs, params)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.recurrence, rec)
    np.testing.assert_array_equal(got.score, score)
    want = [float(score[2:, a : a + w].max()) for a, w in zip(got.starts, got.widths, strict=True)]
    np.testing.assert_array_equal(got.qmax(), want)


def test_fill_equals_the_specification():
    rng = np.random.default_rng(5)
    for _ in range(20):
        rows, cols = int(rng.integers(3, 40)), int(rng.integers(3, 400))
        rec = rng.random((rows, cols)) < rng.uniform(0.02, 0.7)
        sep = rng.random(cols) < 0.05
        sep[:2] = True
        rec[:2] = False
        rec[:, sep] = False
        want = reference_fill(rec, np.zeros(rec.shape, np.float32), sep, 5.0, 0.5)
        got = align._fill(rec, np.zeros(rec.shape, np.float32), sep, 5.0, 0.5)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_split_the_shortlist_without_changing_a_cell(monkeypatch, threads: int):
    from refrain.model import shortlist

    monkeypatch.setattr(shortlist, "_MIN_CHUNK_CELLS", 1)  # split even a small shortlist
    rng = np.random.default_rng(9)
    query = walk(rng, 20)
    refs = [walk(rng, int(rng.integers(2, 120))) for _ in range(11)]
    shifts, rec, score = reference_plots(query, refs, UPPER)
    try:
        shortlist.set_threads(threads)
        got = align.plots(query, refs, UPPER)
    finally:
        shortlist.set_threads(None)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.recurrence, rec)
    np.testing.assert_array_equal(got.score, score)


def test_empty_and_one_reference():
    rng = np.random.default_rng(3)
    query = walk(rng, 12)
    assert len(align.plots(query, []).qmax()) == 0
    ref = walk(rng, 2)
    shifts, _, score = reference_plots(query, [ref], QmaxParams())
    got = align.plots(query, [ref])
    np.testing.assert_array_equal(got.score, score)
    np.testing.assert_array_equal(got.shifts, shifts)


def test_equal_key_fits_pick_the_same_key():
    """A flat query profile fits every key alike: the batched path must pick the pairwise
    path's key among the equals, not one that rounding puts ahead."""
    rng = np.random.default_rng(4)
    query = np.full((16, 12), 0.5, np.float32)
    query[::3] = walk(rng, 6)  # some frames move, the profile stays nearly flat
    refs = [walk(rng, int(rng.integers(8, 80))) for _ in range(12)]
    refs.append(np.full((20, 12), 0.5, np.float32))
    shifts, _, score = reference_plots(query, refs, UPPER)
    got = align.plots(query, refs, UPPER)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.score, score)
