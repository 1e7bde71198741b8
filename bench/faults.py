"""Corruption table: every file of an index deleted, truncated or bit-flipped, then opened.

An index is built with tracks in a snapshot and more in the journal (synthetic vectors and
chroma sequences, FAISS `--factory`). For each file in it and each fault, a copy is damaged
and opened with `open_index`, and the outcome is one of:

    refused    CorruptIndexError (or another SegmentIndexError) naming what is wrong;
               every file is kept
    repaired   opened, and every acknowledged track is there with its exact vectors
               and sequence (derived files such as the catalog or the ANN index rebuilt)
    LOSS       opened, but tracks are missing or differ: silent loss of acknowledged writes
    CRASH      an exception that is not the index's own error

    python bench/faults.py [--tracks 12] [--journal 4] [--factory HNSW8] [--json out.json]

The exit status is 1 if any outcome is LOSS or CRASH. tests/test_faults.py runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

ZDIM = 8
IDENTITY = {"weights_sha256": "faults", "zdim": ZDIM}
FAULTS = ("delete", "truncate", "flip")


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


def check(path: Path, n_tracks: int) -> tuple[str, str]:
    """(outcome, detail) of opening a damaged copy."""
    from refrain.index import SegmentIndexError, open_index

    before = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    try:
        with open_index(path, IDENTITY, create=False) as ix:
            bad = []
            for i in range(n_tracks):
                record, vectors, starts = track(i)
                got = ix.get_track(record.track_id)
                if got is None:
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
            if len(ix) != n_tracks:
                bad.append(f"{len(ix)} tracks listed, {n_tracks} written")
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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", type=int, default=12, help="tracks in the snapshot")
    ap.add_argument("--journal", type=int, default=4, help="tracks only in the journal")
    ap.add_argument("--factory", default="HNSW8", help="FAISS factory (HNSW8: an ANN file)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
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
    width = max(len(r["file"]) for r in rows)
    print(f"{'file':<{width}}  {'fault':<8}  {'outcome':<8}  detail")
    for r in rows:
        print(f"{r['file']:<{width}}  {r['fault']:<8}  {r['outcome']:<8}  {r['detail']}")
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
