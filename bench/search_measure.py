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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refrain.index import IndexOptions, SegmentIndex, TrackRecord, open_index
from refrain.model import align
from refrain.search.ranking import (
    SearchOptions,
    rank_tracks,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
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

from qmax_reference import reference_fill, reference_plots

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
    align.plots = align._one_blas_thread_each_call(reference_plots)  # type: ignore[assignment]
    align._fill = reference_fill
    try:
        yield
    finally:
        align.plots, align._fill = saved
