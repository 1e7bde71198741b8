"""The journal on disk: torn tails are cut away, real corruption is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from refrain.index import CorruptIndexError, TrackRecord, open_index

ZDIM = 8
IDENTITY = {"weights_sha256": "journal-test", "zdim": ZDIM}


def vectors_of(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    n = 1 + i % 5
    return rng.standard_normal((n, ZDIM)).astype(np.float32), np.arange(n) * 5.0


def build(path, n: int = 6, snapshot_after: int | None = None) -> None:
    with open_index(path, IDENTITY) as ix:
        for i in range(n):
            ix.add_track(TrackRecord(f"t{i}", content_sha256=str(i)), *vectors_of(i))
            if snapshot_after is not None and i + 1 == snapshot_after:
                ix.snapshot()


def assert_tracks(path, ids: list[int]) -> None:
    with open_index(path, IDENTITY) as ix:
        assert sorted(t.track_id for t in ix.list_tracks(100)[0]) == [f"t{i}" for i in ids]
        assert len(ix) == len(ids)
        for i in ids:
            np.testing.assert_array_equal(ix.get_vectors(f"t{i}")[0], vectors_of(i)[0])
            _, hits = ix.search(vectors_of(i)[0], 1)
            np.testing.assert_array_equal(hits[:, 0], ix.segment_ids(f"t{i}"))


def build_with_a_last_write_the_catalog_missed(path) -> None:
    """Tracks t0..t5, the catalog as it was before t5's write reached it: the state a crash
    leaves while the last write's record is still being appended."""
    build(path, n=5)
    saved = {f.name: f.read_bytes() for f in path.glob("catalog.sqlite*")}
    with open_index(path, IDENTITY) as ix:
        ix.add_track(TrackRecord("t5", content_sha256="5"), *vectors_of(5))
    for f in path.glob("catalog.sqlite*"):
        f.unlink()
    for name, data in saved.items():
        (path / name).write_bytes(data)


def record_offsets(journal) -> list[int]:
    data = journal.read_bytes()
    offsets, at = [], 16
    while at < len(data):
        offsets.append(at)
        at += 12 + int.from_bytes(data[at + 4 : at + 8], "little")
    return offsets


@pytest.mark.parametrize("cut", [1, 7, 12, 13, 100])
def test_torn_last_record_is_truncated(tmp_path, cut):
    """A write torn by a crash: its journal record is partly on disk and, as the catalog
    applies a write only once its record is durable, the catalog never saw it."""
    path = tmp_path / "idx"
    build_with_a_last_write_the_catalog_missed(path)
    journal = path / "journal.log"
    last = record_offsets(journal)[-1]
    size = journal.stat().st_size
    with open(journal, "r+b") as f:
        f.truncate(max(last + 1, size - cut))
    assert_tracks(path, list(range(5)))
    assert journal.stat().st_size == last  # the torn bytes are gone from disk
    with open_index(path, IDENTITY) as ix:  # appending after the cut works
        ix.add_track(TrackRecord("t5", content_sha256="5"), *vectors_of(5))
    assert_tracks(path, list(range(6)))


@pytest.mark.parametrize(
    "tail",
    [b"\x00" * 4096, b"garbage!" * 3, b"RREC" + b"\xff" * 40, b"RREC\x10\x00\x00\x00" + b"x" * 20],
    ids=["zeros", "text", "bad-length", "bad-crc"],
)
def test_garbage_after_the_last_record_is_truncated(tmp_path, tail):
    path = tmp_path / "idx"
    build(path)
    journal = path / "journal.log"
    size = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(tail)
    assert_tracks(path, list(range(6)))
    assert journal.stat().st_size == size


def test_last_record_with_bad_crc_is_truncated(tmp_path):
    """A crash can leave the full length on disk with unwritten (stale or zero) contents."""
    path = tmp_path / "idx"
    build_with_a_last_write_the_catalog_missed(path)
    journal = path / "journal.log"
    last = record_offsets(journal)[-1]
    data = bytearray(journal.read_bytes())
    data[-10:] = bytes(10)
    journal.write_bytes(bytes(data))
    assert_tracks(path, list(range(5)))
    assert journal.stat().st_size == last


def test_corruption_before_valid_records_is_refused(tmp_path):
    path = tmp_path / "idx"
    build(path)
    journal = path / "journal.log"
    second = record_offsets(journal)[1]
    data = bytearray(journal.read_bytes())
    data[second + 40] ^= 0xFF
    journal.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="not a torn append"):
        open_index(path, IDENTITY)
    assert journal.read_bytes() == bytes(data)  # nothing was dropped


def test_crash_between_snapshot_and_journal_truncation_applies_nothing_twice(tmp_path):
    path = tmp_path / "idx"
    build(path, n=4)
    saved = tmp_path / "journal.before-snapshot"
    shutil.copy(path / "journal.log", saved)
    with open_index(path, IDENTITY) as ix:
        ix.snapshot()
    shutil.copy(saved, path / "journal.log")  # as if the truncation never happened
    assert_tracks(path, list(range(4)))
    assert (path / "journal.log").stat().st_size == 16  # covered records were dropped
    with open_index(path, IDENTITY) as ix:
        ix.add_track(TrackRecord("t4", content_sha256="4"), *vectors_of(4))
    assert_tracks(path, list(range(5)))


def test_journal_gap_after_snapshot_is_refused(tmp_path):
    path = tmp_path / "idx"
    build(path, n=6, snapshot_after=2)
    journal = path / "journal.log"
    offsets = record_offsets(journal)
    data = journal.read_bytes()
    journal.write_bytes(data[:16] + data[offsets[1] :])  # drop the first record after it
    with pytest.raises(CorruptIndexError, match="starts at seq 4"):
        open_index(path, IDENTITY)


def test_snapshot_file_damage_is_detected(tmp_path):
    path = tmp_path / "idx"
    build(path, n=6, snapshot_after=6)
    chunk = next((path / "snapshot").glob("chunk-*.vectors.npy"))
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size - 8)
    with pytest.raises(CorruptIndexError, match="should hold"):
        open_index(path, IDENTITY)


def test_leftovers_of_an_interrupted_snapshot_are_removed(tmp_path):
    path = tmp_path / "idx"
    build(path, n=3, snapshot_after=3)
    for name in ("chunk-9.vectors.npy", "tracks-9.jsonl.tmp", "MANIFEST.json.tmp"):
        (path / "snapshot" / name).write_bytes(b"partial")
    assert_tracks(path, [0, 1, 2])
    assert sorted(p.name for p in (path / "snapshot").iterdir()) == [
        "MANIFEST.json",
        "chunk-1.segments.npy",
        "chunk-1.vectors.npy",
        "tracks-1.jsonl",
    ]
