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
"verify ms" is that stage's median (not in "reduce ms"). A setting ending in ":before"
(512:100:100:before) is served by the previous alignment (`search_measure.previous_alignment`,
pair by pair), to time both in one run; every verified row's recall is taken against the
previous alignment's verified ranking, which the current one must keep.

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
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from refrain.index import IndexOptions, open_index
from refrain.search.ranking import (
    SearchOptions,
)
from refrain.service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import (
    ann_bytes_per_vector,
    meminfo,
    peak_bytes,
    release_memory,
)
from search_data import (
    DATASETS,
    GIB,
    SEGMENTS,
    TOP,
    Dataset,
    ground_truth,
    verify_ground_truth,
)
from search_data import (
    QUERY_SEGMENTS as QUERY_SEGMENTS,  # the clip's segments, read by tests/test_bench.py
)
from search_measure import (
    Built,
    Measured,
    build,
    disk_ingest_rate,
    identity,
    measure,
    param_list,
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


BEFORE: set[int] = set()  # ids of the reducer settings served by the previous alignment


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
        f"{opts.k}:{opts.candidates}"
        + (f":{opts.verify}" if opts.verify else "")
        + (":before" if id(opts) in BEFORE else ""),
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
                            before=id(opts) in BEFORE,
                        )
                        rows.append(row(ds, factory, p, opts, built, m))
                        print_row(rows[-1])
            finally:
                index.close()
                del index  # free the FAISS index before the next build
                release_memory()


def parse_reducer(text: str) -> SearchOptions:
    """ "K:CANDIDATES[:VERIFY[:before]]" -> the service's SearchOptions for a 30 s clip
    (reduction min), with alignment verification of VERIFY candidates; with ":before", by
    the previous alignment (`search_measure.previous_alignment`, listed in `BEFORE`)."""
    before = text.endswith(":before")
    try:
        k, candidates, *verify = (int(x) for x in text.removesuffix(":before").split(":"))
        if len(verify) > 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--reducer expects K:CANDIDATES[:VERIFY] such as 64:100 or 512:100:50, got {text!r}"
        ) from None
    opts = SearchOptions(
        top_k=TOP, k=k, candidates=max(candidates, TOP, *verify), verify=verify[0] if verify else 0
    )
    if before:
        BEFORE.add(id(opts))
    return opts


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
