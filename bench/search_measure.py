"""Build and measure for bench/search.py: N tracks written through the store's journal (as
`refrain index build` does), the on-disk ingestion rate, and the latency and recall of
`rank_tracks` for one search setting against the exhaustive ground truth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refrain.index import IndexOptions, SegmentIndex, TrackRecord, open_index
from refrain.model import align, shortlist
from refrain.model.qmax import QmaxParams, _unit, cross_recurrence, delay_embed
from refrain.search.ranking import (
    SearchOptions,
    rank_tracks,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import (
    reset_peak_rss,
    rss,
)
from search_data import (
    HOP_S,
    SEGMENTS,
    TOP,
    TRACK_S,
    Dataset,
    query_chroma,
    query_segments,
    track_chroma,
    track_id,
    verified_top,
)

# -- build and measure ----------------------------------------------------------------------


@dataclass
class Built:
    ingest_s: float  # add_track of every track (auto snapshots and IVF training included)
    snapshot_s: float  # the final snapshot (the last retraining, if due, happens here)
    rss_bytes: int  # resident set growth from before opening to after the snapshot
    peak_bytes: int  # peak resident set growth during the build
    disk_bytes: int  # index directory after the final snapshot

    @property
    def build_s(self) -> float:
        return self.ingest_s + self.snapshot_s


def identity(zdim: int, seed: int = 0) -> dict:
    return {"weights_sha256": "bench", "zdim": zdim, "hop_s": HOP_S, "seed": seed}


def ingest(
    index: SegmentIndex,
    ds: Dataset,
    limit: int | None = None,
    batch: int = 100,
    sequences: bool = False,
) -> int:
    """Add the tracks through `add_tracks`, `batch` at a time (one journal fsync per batch,
    as `refrain index build` does per chunk), with chroma sequences if `sequences`."""
    from refrain.model.sequence import encode

    n = 0
    starts = np.arange(SEGMENTS, dtype=np.float64) * HOP_S
    for first, x in ds.batches():
        items = []
        for j, vectors in enumerate(x[: None if limit is None else limit - n]):
            i = first + j
            record = TrackRecord(
                track_id(i),
                work_id=f"w{ds.works[i]}",
                duration_s=TRACK_S,
                content_sha256=str(i),
                sequence=encode(*[track_chroma(ds.seed, i)] * 2) if sequences else None,
            )
            items.append((record, vectors, starts))
        for k in range(0, len(items), batch):
            index.add_tracks(items[k : k + batch])
        n += len(items)
        if limit is not None and n >= limit:
            break
    return n


def build(
    path: Path, ds: Dataset, factory: str, search_params: str | None, sequences: bool = False
) -> tuple[SegmentIndex, Built]:
    before, _ = rss()
    reset_peak_rss()
    options = IndexOptions(vector_dtype=ds.dtype, search_params=search_params, use_gpu=False)
    index = open_index(path, identity(ds.zdim, ds.seed), factory, options=options)
    t0 = time.perf_counter()
    ingest(index, ds, sequences=sequences)
    t1 = time.perf_counter()
    index.snapshot()  # as `refrain index build` does: the service then opens without replay
    t2 = time.perf_counter()
    cur, peak = rss()
    return index, Built(t1 - t0, t2 - t1, cur - before, peak - before, index.stats().bytes_on_disk)


def disk_ingest_rate(ds: Dataset, n: int, batch: int) -> float:
    """Tracks per second through `add_tracks` on the system temporary directory (fsyncs)."""
    options = IndexOptions(vector_dtype=ds.dtype, use_gpu=False)
    with (
        tempfile.TemporaryDirectory() as tmp,
        open_index(Path(tmp) / "idx", identity(ds.zdim, ds.seed), "Flat", options=options) as index,
    ):
        t0 = time.perf_counter()
        done = ingest(index, ds, limit=n, batch=batch)
        return done / (time.perf_counter() - t0)


def param_list(factory: str, args: argparse.Namespace) -> list[str | None]:
    if factory.startswith("IVF"):
        nlist = int("".join(ch for ch in factory[3:].split(",")[0] if ch.isdigit()))
        return [f"nprobe={p}" for p in args.nprobe if p <= nlist]
    if "HNSW" in factory:
        return [f"efSearch={e}" for e in args.ef_search]
    return [None]


@dataclass
class Measured:
    p50_ms: float
    p99_ms: float
    search_ms: float  # median kNN share
    reduce_ms: float  # median exact re-ranking share
    verify_ms: float  # median alignment verification share
    recall: float
    hit1: float
    n_queries: int


def measure(
    index: SegmentIndex,
    queries: np.ndarray,
    sources: np.ndarray,
    gt_d: np.ndarray,
    gt_i: np.ndarray,
    opts: SearchOptions,
    segment_s: float,
    max_seconds: float,
    before: bool = False,
) -> Measured:
    """Latency, recall and hits of one setting; `before`: served with the previous
    alignment (`previous_alignment`). The expected verified top 10 is always the previous
    alignment's: the ranking the served one must keep."""
    served = previous_alignment if before else contextlib.nullcontext
    seed = int(index.identity.get("seed", 0))
    chroma = [query_chroma(seed, int(s), n) if opts.verify else None for n, s in enumerate(sources)]
    for q, c in zip(queries[:3], chroma, strict=False):  # warm up (mapped vectors, buffers)
        with served():
            rank_tracks(index, query_segments(q, segment_s, c), opts)
    lat, knn, red, ver, recalls, hits = [], [], [], [], [], []
    start = time.perf_counter()
    for n, q in enumerate(queries):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with served():
            result = rank_tracks(
                index, query_segments(q, segment_s, chroma[n]), opts, timings=timings
            )
        lat.append(time.perf_counter() - t0)
        knn.append(timings["search"])
        red.append(timings["reduce"])
        ver.append(timings.get("verify", 0.0))
        hits.append(bool(result) and result[0].track.track_id == track_id(int(sources[n])))
        if n < len(gt_d) and opts.verify and chroma[n] is not None:
            with previous_alignment():
                expected = verified_top(index, gt_d[n], gt_i[n], chroma[n], opts)
            got = {h.track.track_id for h in result[:TOP]}
            recalls.append(len(got & expected) / TOP)
        elif n < len(gt_d):  # exact distances of the served hits within the 10th exhaustive one
            bound = gt_d[n, TOP - 1] * (1 + 1e-5) + 1e-7
            recalls.append(sum(h.distance <= bound for h in result[:TOP]) / TOP)
        if n >= 9 and time.perf_counter() - start > max_seconds:
            break
    ms = np.array(lat) * 1e3
    return Measured(
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        float(np.median(knn)) * 1e3,
        float(np.median(red)) * 1e3,
        float(np.median(ver)) * 1e3,
        float(np.mean(recalls)) if recalls else float("nan"),
        float(np.mean(hits)),
        len(lat),
    )


# -- the previous alignment, kept to compare before/after in one run --------------------------


@contextlib.contextmanager
def previous_alignment() -> Iterator[None]:
    """`align.plots` and `align._fill` (which `locate` uses) as they were before the batched
    shortlist (`refrain.model.shortlist`), for the "before" rows and for the expected
    verified ranking (today's, which the served one must keep)."""
    saved = align.plots, align._fill
    align.plots = align._one_blas_thread_each_call(_previous_plots)  # type: ignore[assignment]
    align._fill = _previous_fill
    try:
        yield
    finally:
        align.plots, align._fill = saved


def _previous_fill(
    rec: np.ndarray, score: np.ndarray, sep: np.ndarray, gap_onset: float, gap_extend: float
) -> np.ndarray:
    """`align._fill` as it was before: the Qmax recursion of a padded plot, row by row, the
    linked cells' extension added through a mask."""
    pen = np.where(rec, np.float32(gap_onset), np.float32(gap_extend))
    dec = np.empty(rec.shape, np.float32)
    np.subtract(score[:2], pen[:2], out=dec[:2])
    cut = np.flatnonzero(sep[2:]) + 2  # separator columns after the first two: zero in every row
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


def _previous_plots(
    query: np.ndarray,
    refs: Sequence[np.ndarray],
    params: QmaxParams | None = None,
    shifts: np.ndarray | None = None,
) -> align.Plots:
    """`align.plots` as it was before the batched shortlist: key, states, plot and partitions
    pair by pair."""
    p = params or QmaxParams()
    query = np.asarray(query, dtype=np.float32)
    refs = [np.asarray(r, dtype=np.float32) for r in refs]
    if len(refs) == 0:
        empty = np.zeros((len(query) + 2, 0))
        starts, widths, shifts = (np.zeros(0, np.int64) for _ in range(3))
        return align.Plots(empty, empty.astype(bool), starts, widths, shifts, p, query)
    if shifts is None:
        profiles = shortlist.rolled_profiles(query)
        shifts = np.array([np.argmax(align._key_fit(query, r, profiles)) for r in refs], np.int64)
    rolled = {
        int(k): _unit(delay_embed(np.roll(query, k, axis=1), p.m, p.tau)) for k in np.unique(shifts)
    }
    widths = np.array([len(r) for r in refs], dtype=np.int64)
    starts = 2 + np.concatenate([[0], np.cumsum(widths + 2)[:-1]])
    total = int(starts[-1] + widths[-1])
    rec = np.zeros((len(query) + 2, total), dtype=bool)
    sep = np.ones(total, dtype=bool)
    ref_states: dict[int, np.ndarray] = {}
    for c, r in enumerate(refs):
        states = ref_states.setdefault(id(r), _unit(delay_embed(r, p.m, p.tau)))
        a = starts[c]
        rec[2:, a : a + len(r)] = cross_recurrence(rolled[int(shifts[c])], states, p.kappa)
        sep[a : a + len(r)] = False
    score = _previous_fill(rec, np.zeros(rec.shape, np.float32), sep, p.gap_onset, p.gap_extend)
    return align.Plots(score, rec, starts, widths, shifts, p, query)
