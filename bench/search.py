"""Served search benchmark: build, memory, latency and recall of `rank_tracks` per FAISS setting.

    python bench/search.py --quick                              # 2k tracks, smoke run
    python bench/search.py --tracks 10000 100000 --reducer 64:100 512:20
    python bench/search.py --tracks 100000 --factories IVF1024,Flat --nprobe 4 16

N reference tracks of 40 segments (a 3.5-minute track at the 5 s reference hop) at the shipped
model's zdim are written through `SegmentIndex.add_tracks` (100 at a time) and one final
`snapshot()`, as `refrain index build` does, once per FAISS factory. Each search setting
(nprobe for IVF,
efSearch for HNSW; the reducer's neighbours per query segment and candidates re-ranked, as
`--reducer K:CANDIDATES`) then answers 30 s queries
(3 segments at a 5 s hop) through `rank_tracks` with the service's `SearchOptions`, so the
latency is the service's search + reduce time without decoding and embedding.

Data are seeded and regenerated per batch of tracks (nothing of size N is kept by the script):
- random: every segment i.i.d. N(0, 1), no structure; the hardest case for ANN;
- clustered: works (one per 4 tracks on average) with a centre, each track a version of a work
  with its own offset, each segment that plus its own variation, all isotropic;
- model: the same hierarchy drawn with the covariances measured on the shipped model's
  embeddings of a corpus (bench/embedding_stats.py -> bench/data/embedding-stats.npz): a
  trained embedding space is far from isotropic, and ANN indexes depend on that.
A query is a noisy copy of 3 consecutive segments of a stored track ("a version" of it).

Alignment verification (`--reducer K:CANDIDATES:VERIFY`, e.g. 512:100:50): every track is
stored with a seeded chroma sequence as long as its audio (2 frames a second, a random walk
over pitch classes, standing for both its full and its upper chroma: 10.4 KB), and a query
carries 30 s of its source's sequence with noise,
so the VERIFY best candidates are aligned and the returned ones located as in the service.
"verify ms" is that stage's median (not in "reduce ms").

Recall@10 compares the served top 10 with the exhaustive top 10 over every stored track (the
same nsqeuc distances and reduction as `exhaustive_rank`, vectorised over the generated
batches and checked against `exhaustive_rank` itself on a few queries): a served track counts
when its exact distance is within the exhaustive 10th distance. With verification, the
exhaustive answer is the same pipeline on exact search: the VERIFY nearest tracks of the
exhaustive ranking, verified and fused as the service does (`Verification`), and its top 10
are the tracks the served top 10 must hold; so the recall measures what the approximate
search loses, not the reordering verification exists for. hit@1: the query's source track
ranked first.

Ingestion through the store's journal costs two fsyncs per batch (journal, SQLite catalog).
The indexes are built in a tmpfs directory (/dev/shm) by default, where an fsync is free;
the on-disk rate is measured separately on a few tracks, one and 100 per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from refrain.index import IndexOptions, SegmentIndex, TrackRecord, open_index
from refrain.index.search import (
    QuerySegments,
    SearchOptions,
    exhaustive_rank,
    expand_with_first,
    rank_tracks,
)
from refrain.index.verify import Verification
from refrain.model.reduce import nsqeuc
from refrain.model.sequence import QueryChroma
from refrain.service.settings import Settings

SEGMENTS = 40  # segments per reference track
HOP_S = 5.0  # reference and query hop
QUERY_S = 30.0  # query clip length
QUERY_SEGMENTS = 3  # segments of a 30 s clip at a 5 s hop
BATCH = 1000  # tracks generated (and ingested) at a time
TOP = 10
GIB = 1 << 30
DATASETS = ("random", "clustered", "model")
STATS = Path(__file__).resolve().parent / "data" / "embedding-stats.npz"


# -- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Seeded reference vectors, regenerated on demand one batch of tracks at a time."""

    kind: str  # "random" or "clustered"
    n_tracks: int
    zdim: int
    dtype: str  # the store's vector dtype; the ground truth sees the same rounding
    seed: int = 0
    stats: Path = STATS  # covariances of the "model" kind
    works: np.ndarray = field(init=False, repr=False)  # work of each track (clustered, model)
    centres: np.ndarray = field(init=False, repr=False)
    factors: dict = field(init=False, repr=False)  # version, segment and noise factors (model)

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.kind!r}")
        rng = np.random.default_rng([self.seed, 1])
        n_works = max(1, self.n_tracks // 4)
        object.__setattr__(self, "works", rng.integers(0, n_works, self.n_tracks))
        centres = rng.standard_normal((n_works, self.zdim), dtype=np.float32)
        factors = {}
        if self.kind == "model":
            stats = np.load(self.stats)
            if len(stats["mean"]) != self.zdim:
                raise SystemExit(
                    f"{self.stats} describes zdim {len(stats['mean'])}, not "
                    f"{self.zdim}: rerun bench/embedding_stats.py"
                )
            factors = {
                p: stats[f"{p}_factor"].astype(np.float32).T for p in ("work", "version", "segment")
            }
            centres = centres @ factors["work"] + stats["mean"]
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "factors", factors)

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_tracks / BATCH)

    def batch(self, b: int) -> np.ndarray:
        """Tracks b*BATCH .. as stored: (n, SEGMENTS, zdim) float32 (rounded to the dtype)."""
        lo, hi = b * BATCH, min(self.n_tracks, (b + 1) * BATCH)
        rng = np.random.default_rng([self.seed, 2, b])
        shape = (hi - lo, SEGMENTS, self.zdim)
        x = rng.standard_normal(shape, dtype=np.float32)
        if self.kind == "clustered":
            x *= 0.5  # the segment's own variation
            x += 0.5 * rng.standard_normal((hi - lo, 1, self.zdim), dtype=np.float32)  # version
            x += self.centres[self.works[lo:hi]][:, None, :]  # the work
        elif self.kind == "model":
            x = x @ self.factors["segment"]
            x += (
                rng.standard_normal((hi - lo, 1, self.zdim), dtype=np.float32)
                @ self.factors["version"]
            )
            x += self.centres[self.works[lo:hi]][:, None, :]
        return x.astype(self.dtype).astype(np.float32)

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        for b in range(self.n_batches):
            yield b * BATCH, self.batch(b)

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, QUERY_SEGMENTS, zdim) noisy copies of consecutive stored segments, and the
        track each was copied from."""
        rng = np.random.default_rng([self.seed, 3])
        sources = rng.choice(self.n_tracks, size=min(n, self.n_tracks), replace=False)
        offsets = rng.integers(0, SEGMENTS - QUERY_SEGMENTS + 1, len(sources))
        out = np.empty((len(sources), QUERY_SEGMENTS, self.zdim), dtype=np.float32)
        for b in np.unique(sources // BATCH):
            x = self.batch(int(b))
            for i in np.flatnonzero(sources // BATCH == b):
                o = offsets[i]
                out[i] = x[sources[i] % BATCH, o : o + QUERY_SEGMENTS]
        noise = 0.5 * rng.standard_normal(out.shape, dtype=np.float32)
        if self.kind == "model":  # half the spread of a track's own segments
            noise = noise @ self.factors["segment"]
        out += noise
        return out, sources


def track_id(i: int) -> str:
    return f"t{i:07d}"


TRACK_S = (SEGMENTS - 1) * HOP_S + 20.0


def track_chroma(seed: int, i: int) -> np.ndarray:
    """Track i's chroma sequence: a random walk over pitch classes at SEQUENCE_RATE."""
    from refrain.model.sequence import SEQUENCE_RATE

    rng = np.random.default_rng([seed, 7, i])
    n = int(TRACK_S * SEQUENCE_RATE)
    x = np.abs(np.cumsum(0.4 * rng.standard_normal((n, 12)), axis=0)) + rng.random((n, 12))
    return (x / x.max(1, keepdims=True)).astype(np.float32)


def query_chroma(seed: int, source: int, n: int) -> QueryChroma:
    """A 30 s query's sequences: its source's chroma at a seeded offset, with noise (the same
    frames serve as its upper chroma, as they do in each stored sequence)."""
    from refrain.model.sequence import FINE_RATE, SEQUENCE_RATE

    rng = np.random.default_rng([seed, 8, n])
    ref = track_chroma(seed, source)
    m = int(QUERY_S * SEQUENCE_RATE)
    o = int(rng.integers(0, len(ref) - m + 1))
    coarse = np.clip(ref[o : o + m] + 0.1 * rng.random((m, 12)), 0, None)
    fine = np.repeat(coarse, int(FINE_RATE / SEQUENCE_RATE), axis=0)
    coarse = coarse / coarse.max(1, keepdims=True)
    return QueryChroma(coarse, fine, coarse)


def verified_top(
    index: SegmentIndex,
    gt_d: np.ndarray,
    gt_i: np.ndarray,
    chroma: QueryChroma,
    opts: SearchOptions,
) -> set[str]:
    """The exhaustive pipeline's top 10 with verification: the `opts.verify` exhaustive
    nearest tracks aligned, fused and expanded as `rank_tracks` does, the rest in distance
    order."""
    ids = [track_id(int(i)) for i in gt_i]
    v = Verification(
        index,
        ids,
        [float(d) for d in gt_d],
        chroma.chroma,
        chroma.fine,
        opts.fusion(),
        chroma.upper,
    )
    found, vectors, _, offsets = index.gather_vectors(v.ids)
    expand_with_first(v, found, vectors, offsets)
    return set(v.reorder(ids)[:TOP])


def ground_truth(
    ds: Dataset, queries: np.ndarray, depth: int = TOP
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive `min` ranking over every track: (q, depth) distances and track numbers."""
    q = torch.from_numpy(queries.reshape(-1, ds.zdim))
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for first, x in ds.batches():
        d = nsqeuc(q, torch.from_numpy(x.reshape(-1, ds.zdim)))
        d = d.reshape(len(queries), QUERY_SEGMENTS, len(x), SEGMENTS).amin(dim=(1, 3)).numpy()
        cat_d = np.concatenate([best_d, d], axis=1)
        cat_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(first, first + len(x)), d.shape)], axis=1
        )
        order = np.lexsort((cat_i, cat_d), axis=1)[:, :depth]  # distance, then track id
        best_d = np.take_along_axis(cat_d, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
    return best_d, best_i


def query_segments(
    vectors: np.ndarray, segment_s: float, chroma: QueryChroma | None = None
) -> QuerySegments:
    starts = np.arange(QUERY_SEGMENTS, dtype=np.float64) * HOP_S
    coarse, fine, upper = chroma if chroma is not None else (None, None, None)
    return QuerySegments(vectors, starts, segment_s, QUERY_S, chroma=coarse, fine=fine, upper=upper)


def verify_ground_truth(
    index: SegmentIndex, queries: np.ndarray, gt_d: np.ndarray, gt_i: np.ndarray, segment_s: float
) -> None:
    """The vectorised ground truth must equal `exhaustive_rank` (the library's own)."""
    for q, d, i in zip(queries, gt_d, gt_i, strict=True):
        ref = exhaustive_rank(index, query_segments(q, segment_s), "min", TOP)
        ids = [t for t, _ in ref]
        if ids != [track_id(int(k)) for k in i] or not np.allclose(
            [x for _, x in ref], d, rtol=1e-4, atol=1e-6
        ):
            raise SystemExit(
                f"ground truth disagrees with exhaustive_rank: {ref} vs "
                f"{list(zip(map(track_id, i), d, strict=True))}"
            )


# -- memory ---------------------------------------------------------------------------------


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> tuple[int, int]:
    """(current, peak since the last reset) resident set size of this process, bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so that the next build's RSS
    growth is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def ann_bytes_per_vector(factory: str, zdim: int) -> float:
    """Rough size of one vector inside a FAISS index of `factory` (codes, id, graph)."""
    code = 4.0 * zdim
    for part in factory.split(","):
        if part.startswith("PQ"):
            code = float(part[2:].split("x")[0])
        elif part == "SQ8":
            code = float(zdim)
        elif part in ("SQfp16", "SQ16"):
            code = 2.0 * zdim
    graph = 0.0
    if factory.startswith("HNSW"):
        m = int("".join(ch for ch in factory[4:].split(",")[0] if ch.isdigit()) or 32)
        graph = 2 * m * 4 * 1.1
    return code + 8 + graph


def peak_bytes(n_tracks: int, zdim: int, dtype: str, factory: str, tmpfs: bool) -> int:
    """Estimated peak memory of building one index: FAISS in RAM and the vectors written since
    the last snapshot; on tmpfs also the exact copy, the journal and, during the final
    snapshot, the old and the new ANN file."""
    n = n_tracks * SEGMENTS
    ann = n * ann_bytes_per_vector(factory, zdim)
    exact = n * zdim * np.dtype(dtype).itemsize
    pending = min(
        exact, IndexOptions().snapshot_every_records * SEGMENTS * zdim * np.dtype(dtype).itemsize
    )
    total = ann + pending
    if tmpfs:
        total += exact + pending + (0 if factory == "Flat" else 2 * ann)
    return int(total)


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
) -> Measured:
    seed = int(index.identity.get("seed", 0))
    chroma = [query_chroma(seed, int(s), n) if opts.verify else None for n, s in enumerate(sources)]
    for q, c in zip(queries[:3], chroma, strict=False):  # warm up (mapped vectors, buffers)
        rank_tracks(index, query_segments(q, segment_s, c), opts)
    lat, knn, red, ver, recalls, hits = [], [], [], [], [], []
    start = time.perf_counter()
    for n, q in enumerate(queries):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        result = rank_tracks(index, query_segments(q, segment_s, chroma[n]), opts, timings=timings)
        lat.append(time.perf_counter() - t0)
        knn.append(timings["search"])
        red.append(timings["reduce"])
        ver.append(timings.get("verify", 0.0))
        hits.append(bool(result) and result[0].track.track_id == track_id(int(sources[n])))
        if n < len(gt_d) and opts.verify and chroma[n] is not None:
            expected = verified_top(index, gt_d[n], gt_i[n], chroma[n], opts)
            served = {h.track.track_id for h in result[:TOP]}
            recalls.append(len(served & expected) / TOP)
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


# -- driver ---------------------------------------------------------------------------------

HEADER = [
    "data",
    "tracks",
    "setting",
    "k:cand",
    "build s",
    "ingest tr/s",
    "RSS GiB",
    "disk GiB",
    "p50 ms",
    "p99 ms",
    "knn ms",
    "reduce ms",
    "verify ms",
    "recall@10",
    "hit@1",
    "queries",
]


def print_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def row(
    ds: Dataset, factory: str, params: str | None, opts: SearchOptions, built: Built, m: Measured
) -> list[str]:
    setting = factory + (f" {params}" if params else "")
    return [
        ds.kind,
        str(ds.n_tracks),
        setting,
        f"{opts.k}:{opts.candidates}" + (f":{opts.verify}" if opts.verify else ""),
        f"{built.build_s:.1f}",
        f"{ds.n_tracks / built.ingest_s:.0f}",
        f"{built.rss_bytes / GIB:.2f}",
        f"{built.disk_bytes / GIB:.2f}",
        f"{m.p50_ms:.1f}",
        f"{m.p99_ms:.1f}",
        f"{m.search_ms:.1f}",
        f"{m.reduce_ms:.1f}",
        f"{m.verify_ms:.1f}",
        f"{m.recall:.3f}",
        f"{m.hit1:.2f}",
        str(m.n_queries),
    ]


def skip_reason(
    ds: Dataset,
    factory: str,
    args: argparse.Namespace,
    tmpfs: bool,
    hnsw_rate: dict[tuple[str, str], float],
) -> str | None:
    """Why `factory` is not built for `ds` here (too slow or too big), or None."""
    n_seg = ds.n_tracks * SEGMENTS
    if "HNSW" in factory and ds.n_tracks > args.hnsw_max_tracks:
        rate = hnsw_rate.get((factory, ds.kind))
        guess = (
            (
                f", about {n_seg / rate / 60:.0f} min at the {rate:.0f} vectors/s measured "
                "on the smaller run"
            )
            if rate
            else ""
        )
        return (
            f"{n_seg} single-thread HNSW inserts{guess} (--hnsw-max-tracks {args.hnsw_max_tracks})"
        )
    need = peak_bytes(ds.n_tracks, ds.zdim, ds.dtype, factory, tmpfs)
    avail = meminfo("MemAvailable")
    if need > avail - 2 * GIB:  # leave room for the machine's other jobs
        return (
            f"needs about {need / GIB:.1f} GiB ({'index files on tmpfs + ' if tmpfs else ''}"
            f"FAISS in RAM), {avail / GIB:.1f} GiB available; try --dtype float16, a "
            "smaller --zdim, a compressed factory (IVF1024,SQ8 / IVF1024,PQ32) or a disk "
            "--workdir"
        )
    return None


def run_dataset(
    ds: Dataset,
    args: argparse.Namespace,
    segment_s: float,
    workdir: Path,
    rows: list[list[str]],
    hnsw_rate: dict[tuple[str, str], float],
) -> None:
    print(
        f"\n## {ds.kind}, {ds.n_tracks} tracks ({ds.n_tracks * SEGMENTS} segments x {ds.zdim}, "
        f"{ds.dtype})",
        flush=True,
    )
    tmpfs = _is_tmpfs(workdir)
    todo = []
    for factory in args.factories:
        reason = skip_reason(ds, factory, args, tmpfs, hnsw_rate)
        if reason:
            print(f"{factory}: skipped, {reason}", flush=True)
        else:
            todo.append(factory)
    if not todo:
        return
    queries, sources = ds.queries(args.queries)
    t0 = time.perf_counter()
    depth = max([TOP] + [opts.verify for opts in args.reducer])
    gt_d, gt_i = ground_truth(ds, queries[: args.recall_queries], depth)
    print(
        f"exhaustive ground truth of {len(gt_d)} queries in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    verified = args.verify == 0
    for factory in todo:
        n_seg = ds.n_tracks * SEGMENTS
        if reason := skip_reason(ds, factory, args, tmpfs, hnsw_rate):  # memory may have gone
            print(f"{factory}: skipped, {reason}", flush=True)
            continue
        params = param_list(factory, args)
        with tempfile.TemporaryDirectory(dir=workdir, prefix="refrain-bench-") as tmp:
            path = Path(tmp) / "idx"
            sequences = any(opts.verify for opts in args.reducer)
            index, built = build(path, ds, factory, params[0], sequences)
            if "HNSW" in factory:
                hnsw_rate[(factory, ds.kind)] = n_seg / built.ingest_s
            print(
                f"{factory}: built in {built.build_s:.1f} s (ingest {built.ingest_s:.1f} s, "
                f"{ds.n_tracks / built.ingest_s:.0f} tracks/s = "
                f"{n_seg / built.ingest_s:.0f} vectors/s; final snapshot "
                f"{built.snapshot_s:.1f} s), RSS +{built.rss_bytes / GIB:.2f} GiB "
                f"(peak +{built.peak_bytes / GIB:.2f}), {built.disk_bytes / GIB:.2f} GiB "
                "on disk",
                flush=True,
            )
            try:
                if not verified:
                    t = time.perf_counter()
                    n = min(args.verify, len(gt_d))
                    verify_ground_truth(
                        index, queries[:n], gt_d[:n, :TOP], gt_i[:n, :TOP], segment_s
                    )
                    print(
                        f"ground truth equals exhaustive_rank on {n} queries "
                        f"({(time.perf_counter() - t) / n:.1f} s per query)",
                        flush=True,
                    )
                    verified = True
                for p_i, p in enumerate(params):
                    if p_i:  # a search parameter is applied when the index opens
                        index.close()
                        index = open_index(
                            path,
                            identity(ds.zdim, ds.seed),
                            create=False,
                            options=(IndexOptions(search_params=p, use_gpu=False)),
                        )
                    for opts in args.reducer:
                        m = measure(
                            index,
                            queries,
                            sources,
                            gt_d,
                            gt_i,
                            opts,
                            segment_s,
                            args.max_query_seconds,
                        )
                        rows.append(row(ds, factory, p, opts, built, m))
                        print_row(rows[-1])
            finally:
                index.close()
                del index  # free the FAISS index before the next build
                release_memory()


def parse_reducer(text: str) -> SearchOptions:
    """ "K:CANDIDATES[:VERIFY]" -> the service's SearchOptions for a 30 s clip (reduction
    min), with alignment verification of VERIFY candidates."""
    try:
        k, candidates, *verify = (int(x) for x in text.split(":"))
        if len(verify) > 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--reducer expects K:CANDIDATES[:VERIFY] such as 64:100 or 512:100:50, got {text!r}"
        ) from None
    return SearchOptions(
        top_k=TOP, k=k, candidates=max(candidates, TOP, *verify), verify=verify[0] if verify else 0
    )


def _is_tmpfs(path: Path) -> bool:
    best, fs = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fs = mount, kind
    return fs == "tmpfs"


def default_workdir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--datasets", nargs="+", default=["clustered", "random"], choices=DATASETS)
    parser.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,Flat", "HNSW32"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[128, 512])
    parser.add_argument(
        "--reducer",
        nargs="+",
        default=None,
        metavar="K:CANDIDATES",
        help="neighbours per query segment and tracks re-ranked exactly, e.g. "
        "64:100 512:20 (default: the service's knn_k:candidates)",
    )
    parser.add_argument("--queries", type=int, default=100, help="queries timed per setting")
    parser.add_argument(
        "--recall-queries",
        type=int,
        default=100,
        help="the first queries, whose recall is measured",
    )
    parser.add_argument(
        "--max-query-seconds",
        type=float,
        default=30.0,
        help="stop timing a setting after this long (at least 10 queries)",
    )
    parser.add_argument(
        "--verify", type=int, default=2, help="queries checked against exhaustive_rank (0: none)"
    )
    parser.add_argument("--zdim", type=int, default=None, help="default: the shipped model's")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="the store's exact vector copy (the ANN index keeps its own)",
    )
    parser.add_argument(
        "--hnsw-max-tracks",
        type=int,
        default=20_000,
        help="skip HNSW above this (single-thread inserts are slow)",
    )
    parser.add_argument("--threads", type=int, default=1, help="FAISS and torch threads")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where indexes are built (default /dev/shm: fsyncs are free)",
    )
    parser.add_argument(
        "--disk-probe",
        type=int,
        default=300,
        help="tracks ingested on disk to measure the fsync-bound rate (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2000 tracks, Flat / IVF256,Flat / HNSW32, 50 queries",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tracks, args.queries, args.recall_queries = [2000], 50, 50
        if parser.get_default("factories") == args.factories:
            args.factories = ["Flat", "IVF256,Flat", "HNSW32"]
    fields = Settings.model_fields
    args.reducer = [
        parse_reducer(r)
        for r in args.reducer or [f"{fields['knn_k'].default}:{fields['candidates'].default}"]
    ]
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    # a plain `kill` must still remove the index folders: on tmpfs they hold memory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from refrain.model import load_model

    model = load_model()  # the shipped model gives zdim and the segment (shingle) length
    zdim = args.zdim or model.zdim
    segment_s = float(model.config.shingling.len)
    del model
    workdir = args.workdir or default_workdir()
    mem = meminfo("MemTotal")
    print(
        f"# bench/search.py: {os.cpu_count()} CPUs (load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}), {mem / GIB:.1f} GiB RAM, "
        f"faiss {faiss.__version__}, {args.threads} thread(s); zdim {zdim} "
        f"({'--zdim' if args.zdim else 'the shipped model'}), {args.dtype}; indexes in "
        f"{workdir} ({'tmpfs' if _is_tmpfs(workdir) else 'disk'})"
    )
    for n in args.tracks:
        exact = n * SEGMENTS * zdim * np.dtype(args.dtype).itemsize
        if exact + n * SEGMENTS * ann_bytes_per_vector("Flat", zdim) > mem:
            print(
                f"# {n} tracks x {SEGMENTS} x {zdim} {args.dtype}: {exact / 1e9:.0f} GB of "
                f"exact vectors plus as much again in an uncompressed FAISS index, more than "
                f"this machine's {mem / GIB:.1f} GiB; --dtype float16, --zdim 128 or a "
                "compressed factory (IVF4096,SQ8 / IVF4096,PQ32) make it fit"
            )
    if args.disk_probe and not _is_tmpfs(Path(tempfile.gettempdir())):
        probe = Dataset("random", args.disk_probe, zdim, args.dtype, args.seed)
        for batch in (1, 100):
            rate = disk_ingest_rate(probe, args.disk_probe, batch)
            print(
                f"# ingestion on disk ({tempfile.gettempdir()}), {batch} track(s) per "
                f"add_tracks: {rate:.0f} tracks/s ({rate * SEGMENTS:.0f} vectors/s)"
            )
    rows: list[list[str]] = []
    hnsw_rate: dict[tuple[str, str], float] = {}
    for n in args.tracks:
        for kind in args.datasets:
            run_dataset(
                Dataset(kind, n, zdim, args.dtype, args.seed),
                args,
                segment_s,
                workdir,
                rows,
                hnsw_rate,
            )
    print(
        f"\n## Summary (load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})\n"
    )
    print_row(HEADER)
    print_row(["---"] * len(HEADER))
    for r in rows:
        print_row(r)
    return rows


if __name__ == "__main__":
    main()
