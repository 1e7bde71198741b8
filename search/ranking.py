"""The reducer: query segments -> ranked reference tracks with matching time ranges.

1. kNN: the `k` nearest stored segments of every query segment (ANN or exact).
2. Candidates: neighbours grouped by track; the `candidates` tracks with the closest
   neighbour are kept.
3. Exact re-ranking: the full query x reference segment distance matrix of each
   candidate, from the exact stored vectors, reduced with the segment distance
   reduction (`bpwr-10` for clips of 40 s or more, `min` below, as in CLEWS).
4. Verification (`verify`, on by default, when the query carries its chroma sequence): the first
   `verify` candidates re-ranked by fusing the segment distance with a Qmax alignment of
   the chroma sequences, which also says where each returned track matches, at what tempo
   ratio and in what key (`refrain.search.verification`); then expanded with the first of them:
   each candidate's distance to that track's own stored segments counts too.
5. Localisation of tracks not aligned: the best segment pairs (best pairs without
   replacement) give the matching time ranges, query seconds <-> reference seconds. Only
   the first `LOCATED` returned tracks are located; a longer list carries distances only.
6. The aligned tune (`tune`, off by default): each returned track verification located
   carries the tune's contour of the clip over its best match and the reference's over the
   range it aligned with, point for point on the clip's time axis (`AlignedTune`), for a
   person to see why they matched.

A query may come embedded at several transpositions (its CQT rolled by a few semitones
each way): every transposition's segments look for candidates, and a track's distance is
the smallest over the transpositions, which is reported with the hit. The network learns
some invariance to key from its training pitch roll; trying the keys makes it explicit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from refrain.index import SegmentStore, TrackRecord
from refrain.model.align import Alignment
from refrain.model.calibration import uncalibrated_score
from refrain.model.reduce import Reduction, ReductionKind, best_pairs_batch, nsqeuc, reduce
from refrain.search.fusion import Fusion
from refrain.search.tune import AlignedTune, aligned_tunes
from refrain.search.verification import Verification

LONG_CLIP_S = 40.0  # clips at least this long are ranked with bpwr-10, shorter with min
MAX_KNN = 16384  # the most neighbours per query segment `candidate_tracks` grows to
LOCATED = 100  # returned tracks given matching time ranges; further ones: distances only


def default_reduction(query_duration_s: float) -> Reduction:
    return Reduction.parse("bpwr-10" if query_duration_s >= LONG_CLIP_S else "min")


@dataclass(frozen=True)
class SearchOptions:
    top_k: int = 10  # tracks returned
    k: int = 64  # nearest stored segments per query segment
    candidates: int = 100  # tracks re-ranked exactly
    reduction: str | None = None  # None: chosen by query duration
    max_matches: int = 3  # time-range pairs reported per track
    # candidates aligned (alignment verification), the service's default: it runs when the query
    # carries its chroma (`QuerySegments.chroma`) and the candidates' sequences are stored
    # (`TrackRecord.sequence`); 0: none
    verify: int = Fusion.candidates
    verify_weight: float = Fusion.weight  # of the alignment against the segment distance
    verify_expand: float = Fusion.expand  # of the expansion with the first verified track
    tune: bool = False  # located tracks carry their aligned tune (`AlignedTune`)

    def __post_init__(self) -> None:
        for name in ("top_k", "k", "candidates", "max_matches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.verify, int) or self.verify < 0:
            raise ValueError(f"verify must be a non-negative integer, got {self.verify!r}")
        self.fusion()  # checks the weight
        if self.reduction is not None:
            Reduction.parse(self.reduction)  # raises ValueError listing valid names

    def fusion(self) -> Fusion:
        """How verification fuses the alignment with the segment distance of its candidates."""
        return Fusion(max(self.verify, 2), self.verify_weight, self.verify_expand)


@dataclass(frozen=True)
class SegmentMatch:
    query_start_s: float
    query_end_s: float
    ref_start_s: float
    ref_end_s: float
    distance: float


@dataclass(frozen=True)
class TrackHit:
    track: TrackRecord
    distance: float  # reduced nsqeuc distance; lower is closer
    score: float  # in [0, 1], higher is closer
    matches: list[SegmentMatch] | list[Alignment] = field(default_factory=list)
    transposition: int = 0  # semitones the query was shifted by to match this track
    alignment: float | None = None  # Qmax of the verification; None: not aligned
    tune: AlignedTune | None = None  # with `SearchOptions.tune`, of the first aligned match


@dataclass(frozen=True)
class QuerySegments:
    """Embedded query: one vector per segment (per transposition) and where each segment
    starts. With several `shifts`, `vectors` holds the S segments at each shift in turn."""

    vectors: np.ndarray  # (len(shifts) * S, zdim) float32
    starts_s: np.ndarray  # (S,)
    segment_s: float  # segment length in seconds
    duration_s: float  # duration of the query audio
    shifts: tuple[int, ...] = (0,)  # semitones; (0,) = the query as it is
    # chroma sequences for verification (`refrain.model.sequence.Chromagram.query`)
    chroma: np.ndarray | None = None  # (n, 12) at SEQUENCE_RATE
    fine: np.ndarray | None = None  # (n', 12) at FINE_RATE
    upper: np.ndarray | None = None  # (n, 12) upper chroma at SEQUENCE_RATE (None: full only)
    tune: np.ndarray | None = None  # (n, 12) tune chroma at SEQUENCE_RATE (None: not computed)
    contour: np.ndarray | None = None  # the tune's MIDI pitch at CONTOUR_RATE, 0: a rest

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.shifts) * len(self.starts_s):
            raise ValueError(
                f"{len(self.vectors)} vectors for {len(self.shifts)} shifts x "
                f"{len(self.starts_s)} segments"
            )

    def best_shift(self, dist: torch.Tensor, reduction: Reduction) -> tuple[int, float]:
        """(index into `shifts`, reduced distance) of the transposition closest to a reference,
        given the (len(shifts) * S, R) distances of all query rows to its segments; ties go
        to the smaller shift."""
        n = len(self.starts_s)
        return self.pick_shift(
            [float(reduce(dist[i * n : (i + 1) * n], reduction)) for i in range(len(self.shifts))]
        )

    def pick_shift(self, distances: Sequence[float] | np.ndarray) -> tuple[int, float]:
        """(index, distance) of the smallest of one reduced distance per shift; ties go to the
        smaller shift."""
        best = min(
            range(len(distances)), key=lambda i: (distances[i], abs(self.shifts[i]), self.shifts[i])
        )
        return best, float(distances[best])


def key_shifts(n: int) -> tuple[int, ...]:
    """The transpositions tried for `n` semitones either way: 0, then -1, +1, -2, +2, ..."""
    if not 0 <= n <= 6:
        raise ValueError(f"transpositions must be in 0..6 semitones, got {n}")
    return (0, *[s for k in range(1, n + 1) for s in (-k, k)])


def _matching_run(row: torch.Tensor, j: int) -> tuple[int, int]:
    """The run of adjacent reference segments around `j` that match the query segment
    nearly as well as `j` does (within half the way from the best to the row's median).

    A clip shorter than a segment lies inside several overlapping reference segments, and
    the best one alone may cover only part of it; the run covers where it matches.
    """
    best = float(row[j])
    tol = best + 0.5 * max(float(row.median()) - best, 0.0)
    j0 = j1 = j
    while j0 > 0 and float(row[j0 - 1]) <= tol:
        j0 -= 1
    while j1 < len(row) - 1 and float(row[j1 + 1]) <= tol:
        j1 += 1
    return j0, j1


def candidate_tracks(
    index: SegmentStore,
    vectors: np.ndarray,
    k: int,
    n: int,
    reduction: Reduction | None = None,
    n_shifts: int = 1,
) -> list[str]:
    """The `n` tracks whose segments lie nearest the query's, closest first, placed by the
    reduction estimated from the `k` nearest neighbours of each query row
    (`neighbour_estimates`): with `min`, the closest neighbour (exact with an exact index);
    with `bpwr-10`, the mean of the 10 best rows, so that a track matching the whole query
    comes before one matching a single segment closely. While the neighbours hold fewer than
    `n` tracks, `k` doubles (up to the index or `MAX_KNN`): a long list, or a one-segment
    clip, ranks every track it can."""
    total = max(index.n_segments, 1)
    k = max(1, min(k, total))
    pairs = 1 if reduction is None or reduction.kind is ReductionKind.MIN else reduction.k or 10
    while True:
        distances, ids = index.search(vectors, k)
        track_ids, _ = index.segment_info(ids)
        names, estimates = neighbour_estimates(distances, track_ids, n_shifts, pairs)
        if len(names) >= n or k >= min(total, MAX_KNN):
            break
        k = min(2 * k, total, MAX_KNN)
    order = np.lexsort((names, estimates))
    return [str(names[i]) for i in order[:n]]


def neighbour_estimates(
    distances: np.ndarray, track_ids: np.ndarray, n_shifts: int, pairs: int
) -> tuple[np.ndarray, np.ndarray]:
    """(track ids, estimated distances) of the tracks among the neighbours: per query row, the
    track's closest neighbour (a row where it has none counts the row's farthest neighbour, a
    lower bound), then the mean of its `pairs` best rows, the smallest over the shifts."""
    d = np.asarray(distances, dtype=np.float64)
    flat_ids, flat_d, rows = track_ids.ravel(), d.ravel(), len(d)
    live = np.fromiter((t is not None for t in flat_ids), bool, len(flat_ids))
    live &= np.isfinite(flat_d)
    names, codes = np.unique(flat_ids[live].astype(str), return_inverse=True)
    if not len(names):
        return names, np.empty(0)
    farthest = np.where(np.isfinite(d), d, -np.inf).max(axis=1)
    farthest = np.where(np.isfinite(farthest), farthest, np.inf)
    best = np.repeat(farthest[:, None], len(names), axis=1)  # (rows, tracks)
    row_of = np.repeat(np.arange(rows), d.shape[1])[live]
    np.minimum.at(best, (row_of, codes), flat_d[live])
    per_shift = best.reshape(n_shifts, rows // n_shifts, len(names))
    p = max(1, min(pairs, per_shift.shape[1]))
    estimates = np.sort(per_shift, axis=1)[:, :p].mean(axis=1).min(axis=0)
    return names, estimates


def _reduce_by_track(
    dist: torch.Tensor, offsets: np.ndarray, query: QuerySegments, reduction: Reduction
) -> list[tuple[int, float]]:
    """(best shift, reduced distance) per track, from the query rows x all candidates'
    segments matrix whose columns `offsets` split by track."""
    if reduction == Reduction.parse("min"):  # vectorised: row minima per track, then per shift
        n, n_shifts = len(query.starts_s), len(query.shifts)
        per_track = np.minimum.reduceat(dist.numpy(), offsets[:-1], axis=1)
        per_shift = per_track.reshape(n_shifts, n, -1).min(axis=1)  # (shifts, tracks)
        return [query.pick_shift(col) for col in per_shift.T]
    return [query.best_shift(dist[:, a:b], reduction) for a, b in itertools.pairwise(offsets)]


def expand_with_first(
    verification: Verification, found: list[str], ref_all: np.ndarray, offsets: np.ndarray
) -> None:
    """Expand `verification`'s order with its first track (`Verification.expand`): the
    whole-track segment distances (`bpwr-10`, as between two references) from that track's
    stored segments to those of each verified candidate, read from the gathered vectors
    (`SegmentStore.gather_vectors`: track ids, their rows, the rows' offsets per track).
    Nothing changes with expansion off or one candidate."""
    ids = verification.ids
    if not verification.fusion.expand or len(ids) < 2:
        return
    refs = torch.from_numpy(ref_all)
    rows = {tid: refs[offsets[j] : offsets[j + 1]] for j, tid in enumerate(found)}
    first = rows[verification.order[0]]
    reduction = default_reduction(LONG_CLIP_S)
    verification.expand([float(reduce(nsqeuc(first, rows[t]), reduction)) for t in ids])


def rank_tracks(
    index: SegmentStore,
    query: QuerySegments,
    options: SearchOptions,
    score: Callable[[float], float] = uncalibrated_score,
    timings: dict[str, float] | None = None,
    fused_score: Callable[[float, float, float], float] | None = None,
) -> list[TrackHit]:
    """Search `index` with an embedded query; the `top_k` closest tracks, closest first.

    `score` maps a distance to the hit's score; `fused_score` (distance, Qmax per query
    frame, standardised log Qmax among the candidates) scores the tracks verification
    aligned (None: `score` for them too).

    `timings`, when given, receives the seconds spent in the kNN ("search") and in the
    exact re-ranking ("reduce").
    """
    timings = {} if timings is None else timings
    timings["search"] = timings["reduce"] = 0.0
    if options.verify and query.chroma is not None:
        timings["verify"] = 0.0
    reduction = (
        Reduction.parse(options.reduction)
        if options.reduction
        else default_reduction(query.duration_s)
    )
    if index.n_segments == 0 or len(query.vectors) == 0:
        return []
    q = torch.from_numpy(np.ascontiguousarray(query.vectors, dtype=np.float32))
    hits = []
    t0 = time.perf_counter()
    candidates = candidate_tracks(
        index, query.vectors, options.k, options.candidates, reduction, len(query.shifts)
    )
    t1 = time.perf_counter()
    timings["search"] = t1 - t0
    n = len(query.starts_s)
    # One distance matrix for every candidate's stored segments (tracks deleted since the
    # kNN are skipped), split by track for the reduction.
    found, ref_all, starts_all, offsets = index.gather_vectors(candidates)
    dist_all = nsqeuc(q, torch.from_numpy(ref_all))
    reduced = _reduce_by_track(dist_all, offsets, query, reduction) if found else []
    scored: list[
        tuple[float, str, int, torch.Tensor, np.ndarray]
    ] = []  # (distance, track id, best shift, its rows of the distance matrix, ref starts)
    for j, (tid, (b, d)) in enumerate(zip(found, reduced, strict=True)):
        lo, hi = offsets[j], offsets[j + 1]
        scored.append((d, tid, b, dist_all[b * n : (b + 1) * n, lo:hi], starts_all[lo:hi]))
    scored.sort(key=lambda s: (s[0], s[1]))
    verification = None
    if options.verify and query.chroma is not None and scored:
        t2 = time.perf_counter()
        verification = Verification(
            index,
            [s[1] for s in scored],
            [s[0] for s in scored],
            query.chroma,
            query.fine,
            options.fusion(),
            query.upper,
            query.tune,
        )
        if verification.ran:
            expand_with_first(verification, found, ref_all, offsets)
            position = {
                tid: i for i, tid in enumerate(verification.reorder([s[1] for s in scored]))
            }
            scored.sort(key=lambda s: position[s[1]])
        timings["verify"] = time.perf_counter() - t2
    # Catalog records and time ranges only for the tracks returned.
    returned: list[tuple[float, TrackRecord, int, torch.Tensor, np.ndarray]] = []
    for d, tid, b, dist, ref_starts in scored:
        if len(returned) == options.top_k:
            break
        track = index.get_track(tid)
        if track is not None:  # else deleted meanwhile
            returned.append((d, track, b, dist, ref_starts))
    located: dict[str, list[Alignment]] = {}
    if verification is not None:
        t2 = time.perf_counter()
        located = verification.locate(
            [(r[1].track_id, r[1].duration_s) for r in returned[:LOCATED]],
            options.max_matches,
            query.duration_s,
        )
        timings["verify"] += time.perf_counter() - t2
    tunes: dict[str, AlignedTune | None] = {}
    if options.tune and located and query.contour is not None:
        t2 = time.perf_counter()
        tunes = aligned_tunes(index, located, query.contour)
        timings["verify"] += time.perf_counter() - t2
    pairs = best_pairs_batch([r[3] for r in returned[:LOCATED]], options.max_matches)
    pairs += [[] for _ in returned[LOCATED:]]
    for (d, track, b, dist, ref_starts), track_pairs in zip(returned, pairs, strict=True):
        aligned = located.get(track.track_id)
        if aligned is not None and verification is not None:
            qmax = verification.qmax[track.track_id]
            per_frame = qmax / max(len(verification.plot.query), 1)
            hits.append(
                TrackHit(
                    track=track,
                    distance=d,
                    score=(
                        fused_score(d, per_frame, verification.relative[track.track_id])
                        if fused_score
                        else score(d)
                    ),
                    matches=aligned,
                    transposition=query.shifts[b],
                    alignment=qmax,
                    tune=tunes.get(track.track_id),
                )
            )
            continue
        matches = []
        for i, j in track_pairs:
            j0, j1 = _matching_run(dist[i], j)
            ref_end = ref_starts[j1] + query.segment_s
            if track.duration_s:
                ref_end = min(ref_end, track.duration_s)
            matches.append(
                SegmentMatch(
                    query_start_s=float(query.starts_s[i]),
                    query_end_s=float(min(query.starts_s[i] + query.segment_s, query.duration_s)),
                    ref_start_s=float(ref_starts[j0]),
                    ref_end_s=float(ref_end),
                    distance=float(dist[i, j]),
                )
            )
        hits.append(
            TrackHit(
                track=track,
                distance=d,
                score=score(d),
                matches=matches,
                transposition=query.shifts[b],
            )
        )
    timings["reduce"] = time.perf_counter() - t1 - timings.get("verify", 0.0)
    return hits


def exhaustive_rank(
    index: SegmentStore, query: QuerySegments, reduction: str, top_k: int
) -> list[tuple[str, float]]:
    """Every stored track compared with the query: the ground truth `rank_tracks` approximates."""
    q = torch.from_numpy(np.ascontiguousarray(query.vectors, dtype=np.float32))
    red = Reduction.parse(reduction)
    out = []
    cursor = None
    while True:
        page, cursor = index.list_tracks(1000, cursor)
        for track in page:
            ref, _ = index.get_vectors(track.track_id)
            _, d = query.best_shift(nsqeuc(q, torch.from_numpy(ref)), red)
            out.append((track.track_id, d))
        if cursor is None:
            break
    out.sort(key=lambda t: (t[1], t[0]))
    return out[:top_k]
