"""Crash and corruption table: every file of an index deleted, truncated or bit-flipped, and
processes killed with SIGKILL while they add tracks or write a snapshot; then the index opened.

An index is built with tracks in a snapshot and more in the journal (synthetic vectors and
chroma sequences, FAISS `--factory`). For each file in it and each fault, a copy is damaged
and opened with `open_index`. Then a child process adds tracks and is killed after its k-th
acknowledged add, and `refrain index snapshot` is killed at points through its snapshot of a
larger journal. The outcome is one of:

    refused    CorruptIndexError (or another SegmentIndexError) naming what is wrong;
               every file is kept
    repaired   opened, and every acknowledged track is there with its exact vectors
               and sequence (derived files such as the catalog or the ANN index rebuilt)
               (after a kill: every acknowledged track, and the one in flight whole or absent)
    LOSS       opened, but tracks are missing or differ: silent loss of acknowledged writes
    CRASH      an exception that is not the index's own error

    python bench/faults.py [--tracks 12] [--journal 4] [--factory HNSW8] [--snapshot-journal 600]
                           [--no-kills] [--json out.json]

The exit status is 1 if any outcome is LOSS or CRASH. tests/test_faults.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ZDIM = 8
IDENTITY = {"weights_sha256": "faults", "zdim": ZDIM}
FAULTS = ("delete", "truncate", "flip")
KILL_AFTER_ACKS = (1, 4, 16)
KILL_SNAPSHOT_AT = (0.0, 0.25, 0.5, 0.75, 1.0)  # fractions of an uninterrupted snapshot's time


def track(i: int):
    from refrain.index import TrackRecord

    rng = np.random.default_rng(zlib.crc32(f"faults/{i}".encode()))
    n = int(rng.integers(2, 9))
    seq = rng.integers(0, 256, 12 * int(rng.integers(4, 40)), dtype=np.uint8).tobytes()
    record = TrackRecord(f"t{i:03d}", title=f"T{i}", content_sha256=str(i), sequence=seq)
    return record, rng.standard_normal((n, ZDIM)).astype(np.float32), np.arange(n) * 5.0


def build(path: Path, n_snapshot: int, n_journal: int, factory: str) -> None:
    from refrain.index import open_index

    with open_index(path, IDENTITY, factory) as ix:
        for i in range(n_snapshot):
            ix.add_track(*track(i))
        ix.snapshot()
        for i in range(n_snapshot, n_snapshot + n_journal):
            ix.add_track(*track(i))


def damage(path: Path, fault: str, seed: int) -> None:
    if fault == "delete":
        path.unlink()
    elif fault == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # 64 bytes flipped in the middle (or the whole file if smaller)
        data = bytearray(path.read_bytes())
        at = max(0, len(data) // 2 - 32)
        for k in range(at, min(len(data), at + 64)):
            data[k] ^= 0xFF
        path.write_bytes(bytes(data))


def check(path: Path, n_tracks: int, in_flight: int = 0) -> tuple[str, str]:
    """(outcome, detail) of opening a damaged copy: tracks 0..n_tracks-1 were acknowledged,
    and the next `in_flight` may be there (then whole) or not."""
    from refrain.index import SegmentIndexError, open_index

    before = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    try:
        with open_index(path, IDENTITY, create=False) as ix:
            bad = []
            listed = len(ix)
            for i in range(n_tracks + in_flight):
                record, vectors, starts = track(i)
                got = ix.get_track(record.track_id)
                if got is None:
                    if i < n_tracks:
                        bad.append(f"{record.track_id} missing")
                    continue
                v, s = ix.get_vectors(record.track_id)
                if not (np.array_equal(v, vectors) and np.array_equal(s, starts)):
                    bad.append(f"{record.track_id} vectors differ")
                elif ix.sequences([record.track_id]) != {record.track_id: record.sequence}:
                    bad.append(f"{record.track_id} sequence differs")
                else:
                    _, hits = ix.search(vectors[:1], 1)
                    if hits[0, 0] != ix.segment_ids(record.track_id)[0]:
                        bad.append(f"{record.track_id} not found by search")
            if not n_tracks <= listed <= n_tracks + in_flight:
                bad.append(f"{listed} tracks listed, {n_tracks} acknowledged")
        if bad:
            return "LOSS", "; ".join(bad[:3]) + (f" (+{len(bad) - 3})" if len(bad) > 3 else "")
        return "repaired", "all tracks intact"
    except SegmentIndexError as e:
        after = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        lost = sorted(set(before) - set(after) - {"LOCK"})
        first = str(e).split(";")[0]
        if lost:
            return "LOSS", f"refused ({type(e).__name__}) but deleted {', '.join(lost)}"
        return "refused", f"{type(e).__name__}: {first[:140]}"
    except Exception as e:  # noqa: BLE001 - the table reports every other failure
        return "CRASH", f"{type(e).__name__}: {str(e)[:140]}"


# -- kill -9 ---------------------------------------------------------------------------------


def child_add(path: Path, start: int, stop: int) -> None:
    """Child process: add tracks start..stop-1, printing `ack i` once each add returned."""
    from refrain.index import open_index

    with open_index(path, IDENTITY, create=False) as ix:
        for i in range(start, stop):
            ix.add_track(*track(i))
            print(f"ack {i}", flush=True)


def kill_during_adds(clean: Path, work: Path, n: int, acks: int) -> tuple[str, str]:
    shutil.copytree(clean, work)
    child = subprocess.Popen(
        [sys.executable, __file__, "--child-add", str(work), str(n), str(n + 1000)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked = 0
    for line in child.stdout:
        if line.startswith("ack "):
            acked += 1
            if acked == acks:
                child.send_signal(signal.SIGKILL)
                break
    child.wait()
    return check(work, n + acked, in_flight=1)


def kill_during_snapshot(
    clean: Path, work: Path, n: int, fraction: float, seconds: float
) -> tuple[str, str, float]:
    """`refrain index snapshot` killed `fraction * seconds` after it starts writing; returns
    the outcome and the time from the start of writing to the end (for fraction 1: whole)."""
    data = work / "data"
    shutil.copytree(clean, data / "index")
    env = {**os.environ, "REFRAIN_INDEX_BACKEND": "faiss"}
    code = "import sys; from refrain.service.cli import main; sys.exit(main())"
    child = subprocess.Popen(
        [sys.executable, "-c", code, "index", "snapshot", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stderr is not None
    for line in child.stderr:
        if line.startswith("snapshot: writing"):
            break
    started = time.perf_counter()
    if fraction < 1.0:
        time.sleep(fraction * seconds)
        child.send_signal(signal.SIGKILL)
    child.communicate()
    took = time.perf_counter() - started
    finished = child.returncode == 0
    outcome, detail = check(data / "index", n)
    state = "finished" if finished else f"killed after {took * 1e3:.0f} ms"
    return outcome, f"{state}; {detail}", took


def kill_rows(clean: Path, tmp: Path, n: int, args: argparse.Namespace) -> list[dict]:
    """The kill -9 rows: adds killed after k acknowledgements, then snapshots of a larger
    journal killed at fractions of the time an uninterrupted one takes."""
    rows = []
    for acks in KILL_AFTER_ACKS:
        outcome, detail = kill_during_adds(clean, tmp / f"adds-{acks}", n, acks)
        rows.append(
            {
                "file": "(adds)",
                "fault": f"kill -9 after {acks} acks",
                "outcome": outcome,
                "detail": detail,
            }
        )
    big = tmp / "big"
    build(big, args.tracks, args.snapshot_journal, args.factory)
    n_big = args.tracks + args.snapshot_journal
    _, _, seconds = kill_during_snapshot(big, tmp / "snap-timing", n_big, 1.0, 0.0)
    for fraction in KILL_SNAPSHOT_AT:
        work = tmp / f"snap-{fraction}"
        outcome, detail, _ = kill_during_snapshot(big, work, n_big, fraction, seconds)
        rows.append(
            {
                "file": "(snapshot)",
                "fault": f"kill -9 at {fraction:.0%}",
                "outcome": outcome,
                "detail": detail,
            }
        )
        shutil.rmtree(work)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", type=int, default=12, help="tracks in the snapshot")
    ap.add_argument("--journal", type=int, default=4, help="tracks only in the journal")
    ap.add_argument("--factory", default="HNSW8", help="FAISS factory (HNSW8: an ANN file)")
    ap.add_argument(
        "--snapshot-journal",
        type=int,
        default=600,
        help="tracks the kill -9 snapshot cases write from the journal into a snapshot",
    )
    ap.add_argument("--no-kills", action="store_true", help="only the damaged files")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child-add", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_add:
        child_add(Path(args.child_add[0]), int(args.child_add[1]), int(args.child_add[2]))
        return []
    n = args.tracks + args.journal
    rows = []
    with tempfile.TemporaryDirectory(prefix="refrain-faults-") as tmp:
        clean = Path(tmp) / "clean"
        build(clean, args.tracks, args.journal, args.factory)
        files = sorted(
            p.relative_to(clean) for p in clean.rglob("*") if p.is_file() and p.name != "LOCK"
        )
        for k, rel in enumerate(files):
            for fault in FAULTS:
                copy = Path(tmp) / f"case-{k}-{fault}"
                shutil.copytree(clean, copy)
                damage(copy / rel, fault, k)
                outcome, detail = check(copy, n)
                rows.append(
                    {"file": rel.as_posix(), "fault": fault, "outcome": outcome, "detail": detail}
                )
                shutil.rmtree(copy)
        if not args.no_kills:
            rows += kill_rows(clean, Path(tmp), n, args)
    width = max(len(r["file"]) for r in rows)
    fw = max(len(r["fault"]) for r in rows)
    print(f"{'file':<{width}}  {'fault':<{fw}}  {'outcome':<8}  detail")
    for r in rows:
        print(f"{r['file']:<{width}}  {r['fault']:<{fw}}  {r['outcome']:<8}  {r['detail']}")
    counts = {
        o: sum(r["outcome"] == o for r in rows) for o in ("refused", "repaired", "LOSS", "CRASH")
    }
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(r["outcome"] in ("LOSS", "CRASH") for r in rows) else 0)
