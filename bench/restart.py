"""Restart time against the journal a restart replays: what the snapshot interval costs.

    python bench/restart.py                          # 0, 1k and 10k tracks pending, 40 x 256
    python bench/restart.py --tracks 0 2000 --zdim 128 --repeats 5

A restart (`open_index`) loads the last snapshot and replays every journal record written since
(one per track written), so `REFRAIN_SNAPSHOT_EVERY_RECORDS` and `REFRAIN_SNAPSHOT_EVERY_BYTES`
bound the replay. For each N this builds a Flat index whose N tracks are all pending in the
journal (no snapshot), times `open_index` (median of the repeats), then writes a snapshot and
times the open of the same tracks without a replay. `x_snapshot` is the ratio of the two and
`ms/record` the replay's cost per pending record (their difference over N): both compare runs
made moments apart, so they hold better than the seconds on a busy machine. `snapshot_s` is
what writing that snapshot took (writes wait meanwhile, searches do not). The page cache is
warm (the files were just written): a cold start adds reading the journal from disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from refrain.index import IndexOptions, TrackRecord, open_index

BATCH = 100  # tracks per add_tracks call while building
HEADER = [
    "pending",
    "journal_MB",
    "open_s",
    "snapshot_open_s",
    "x_snapshot",
    "ms/record",
    "snapshot_s",
]


def build(path: Path, n_tracks: int, segments: int, zdim: int, options: IndexOptions) -> None:
    """N tracks of `segments` seeded vectors, every one a journal record (no snapshot)."""
    rng = np.random.default_rng(0)
    identity = {"weights_sha256": "bench", "zdim": zdim}
    starts = np.arange(segments) * 5.0
    with open_index(path, identity, "Flat", options=options) as index:
        for first in range(0, n_tracks, BATCH):
            items = [
                (
                    TrackRecord(f"t{n:07d}", content_sha256=str(n)),
                    rng.standard_normal((segments, zdim), dtype=np.float32),
                    starts,
                )
                for n in range(first, min(first + BATCH, n_tracks))
            ]
            index.add_tracks(items)


def time_open(path: Path, zdim: int, options: IndexOptions, repeats: int) -> tuple[float, int]:
    """Median seconds of `open_index` + `close`, and the journal's size in bytes."""
    identity = {"weights_sha256": "bench", "zdim": zdim}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index = open_index(path, identity, options=options)
        times.append(time.perf_counter() - t0)
        journal = index.stats().journal_bytes
        index.close()
    return statistics.median(times), journal


def measure(
    n_tracks: int, segments: int, zdim: int, repeats: int, root: Path
) -> dict[str, float | int]:
    # intervals above anything built here: nothing is snapshotted until the bench asks
    options = IndexOptions(snapshot_every_records=10**9, snapshot_every_bytes=1 << 40)
    path = root / f"idx-{n_tracks}"
    build(path, n_tracks, segments, zdim, options)
    replay_s, journal = time_open(path, zdim, options, repeats)
    with open_index(path, {"weights_sha256": "bench", "zdim": zdim}, options=options) as index:
        t0 = time.perf_counter()
        index.snapshot()
        snapshot_write_s = time.perf_counter() - t0
    snapshot_s, _ = time_open(path, zdim, options, repeats)
    return {
        "pending": n_tracks,
        "journal_MB": journal / 1e6,
        "open_s": replay_s,
        "snapshot_open_s": snapshot_s,
        "snapshot_s": snapshot_write_s,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, nargs="+", default=[0, 1000, 10_000])
    parser.add_argument("--segments", type=int, default=40, help="segments per track")
    parser.add_argument("--zdim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: temp)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(
        f"{args.segments} segments x {args.zdim} float32 per track, Flat, median of "
        f"{args.repeats} opens; {os.cpu_count()} CPUs, load average {load[0]:.2f} at start"
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in args.tracks:
            rows.append(measure(n, args.segments, args.zdim, args.repeats, Path(tmp)))
            shutil.rmtree(Path(tmp) / f"idx-{n}")  # only one index on disk at a time
    print(" | ".join(f"{h:>15}" for h in HEADER))
    for row in rows:
        pending, replay, snap = int(row["pending"]), row["open_s"], row["snapshot_open_s"]
        row["x_snapshot"] = replay / snap
        row["ms/record"] = (replay - snap) / pending * 1e3 if pending else float("nan")
        cells = [
            f"{pending:>15}",
            f"{row['journal_MB']:>15.1f}",
            f"{replay:>15.3f}",
            f"{snap:>15.3f}",
            f"{row['x_snapshot']:>15.1f}",
            f"{row['ms/record']:>15.3f}",
            f"{row['snapshot_s']:>15.3f}",
        ]
        print(" | ".join(cells))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return rows


if __name__ == "__main__":
    main()
