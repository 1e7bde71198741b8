"""Recovery refuses what it cannot prove and repairs what is derived: a lost snapshot manifest,
a damaged catalog, a failed journal append, journal loss and damaged snapshot chunks."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
from test_index_journal import IDENTITY, assert_tracks, build, vectors_of

from refrain.index import (
    CatalogUnavailableError,
    CorruptIndexError,
    InsufficientStorageError,
    TrackRecord,
    open_index,
)
from refrain.index.catalog import Catalog


def snapshot_files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "snapshot").iterdir())}


@pytest.mark.parametrize("journal_records", [0, 2], ids=["empty-journal", "journal-records"])
def test_missing_manifest_refuses_and_keeps_every_file(tmp_path, journal_records):
    path = tmp_path / "idx"
    build(path, n=4 + journal_records, snapshot_after=4)
    (path / "snapshot" / "MANIFEST.json").unlink()
    before = snapshot_files(path)
    journal = (path / "journal.log").read_bytes()
    with pytest.raises(CorruptIndexError) as e:
        open_index(path, IDENTITY)
    message = str(e.value)
    assert "MANIFEST.json" in message and "deploy/README.md" in message
    assert "Backup and restore" in message
    assert snapshot_files(path) == before  # nothing deleted
    assert (path / "journal.log").read_bytes() == journal


def test_snapshot_files_without_manifest_are_dropped_when_the_journal_holds_everything(tmp_path):
    """An interrupted first snapshot: the journal still starts at seq 1, so it is complete."""
    path = tmp_path / "idx"
    build(path, n=3)
    (path / "snapshot").mkdir()
    (path / "snapshot" / "chunk-1.vectors.npy").write_bytes(b"partial")
    (path / "snapshot" / "tracks-1.jsonl").write_bytes(b"partial")
    assert_tracks(path, [0, 1, 2])
    assert list((path / "snapshot").iterdir()) == []


def assert_stored(path, n: int) -> None:
    """Tracks t0..t<n-1> listed, with their vectors and metadata (ids sort as text)."""
    with open_index(path, IDENTITY) as ix:
        tracks, _ = ix.list_tracks(100)
        assert [t.track_id for t in tracks] == sorted(f"t{i}" for i in range(n))
        for i in range(n):
            assert ix.get_track(f"t{i}").content_sha256 == str(i)
            np.testing.assert_array_equal(ix.get_vectors(f"t{i}")[0], vectors_of(i)[0])


def flip(file, offset: int, n: int) -> None:
    data = bytearray(file.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_page_corruption_of_the_catalog_is_detected_and_rebuilt(tmp_path):
    path = tmp_path / "idx"
    build(path, n=12, snapshot_after=8)  # 8 tracks in the snapshot, 4 in the journal
    catalog = path / "catalog.sqlite"
    flip(catalog, 8000, 64)  # the cells of the tracks table's page (page 2)
    with sqlite3.connect(catalog) as db:  # the damage is real: SQLite sees it too
        assert db.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    assert_stored(path, 12)
    with sqlite3.connect(catalog) as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def test_catalog_damage_met_while_open_is_repaired(tmp_path):
    path = tmp_path / "idx"
    build(path, n=12, snapshot_after=8)
    with open_index(path, IDENTITY) as ix:
        flip(path / "catalog.sqlite", 8000, 64)
        tracks, _ = ix.list_tracks(100)  # rebuilt from the snapshot and journal, then read
        assert [t.track_id for t in tracks] == sorted(f"t{i}" for i in range(12))
        assert ix.get_track("t11").content_sha256 == "11"
        ix.add_track(TrackRecord("t12", content_sha256="12"), *vectors_of(12))
        assert ix.failure is None
    assert_stored(path, 13)


# -- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_refuses_the_write_and_writes_resume_once_space_is_back(small_disk):
    path = small_disk.path / "idx"
    build(path, n=3)
    with open_index(path, IDENTITY) as ix:
        journal = (path / "journal.log").stat().st_size
        small_disk.fill()
        big = np.ones((400, 8), np.float32), np.arange(400) * 5.0  # a 16 kB journal record
        for _ in range(2):
            with pytest.raises(InsufficientStorageError, match="full"):
                ix.add_track(TrackRecord("big", content_sha256="big"), *big)
        assert (path / "journal.log").stat().st_size == journal  # the partial record is gone
        assert ix.failure is None and "big" not in ix and len(ix) == 3
        small_disk.free()
        ix.add_track(TrackRecord("t3", content_sha256="3"), *vectors_of(3))  # no reopen
        ix.add_track(TrackRecord("t4", content_sha256="4"), *vectors_of(4))
    assert_tracks(path, [0, 1, 2, 3, 4])


def test_a_catalog_write_that_fails_is_caught_up_from_the_journal(tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build(path, n=2)
    with open_index(path, IDENTITY) as ix:
        real = Catalog.apply_many
        full = {"on": True}

        def apply_many(self, records):
            if full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return real(self, records)

        monkeypatch.setattr(Catalog, "apply_many", apply_many)
        ix.add_track(TrackRecord("t2", content_sha256="2"), *vectors_of(2))  # durable
        assert "catalog.sqlite is behind the journal" in ix.failure
        with pytest.raises(CatalogUnavailableError, match="behind the journal"):
            ix.get_track("t2")  # never a stale answer
        full["on"] = False
        assert ix.get_track("t2").content_sha256 == "2"
        assert ix.failure is None
        ix.add_track(TrackRecord("t3", content_sha256="3"), *vectors_of(3))
    assert_tracks(path, [0, 1, 2, 3])


def test_a_catalog_left_behind_catches_up_by_itself(tmp_path, monkeypatch):
    """No read or write after the disk has room again: a background retry clears the
    failure, and the catalog holds the write."""
    path = tmp_path / "idx"
    build(path, n=2)
    with open_index(path, IDENTITY) as ix:
        real = Catalog.apply_many
        full = {"on": True}

        def apply_many(self, records):
            if full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return real(self, records)

        monkeypatch.setattr(Catalog, "apply_many", apply_many)
        ix.add_track(TrackRecord("t2", content_sha256="2"), *vectors_of(2))
        time.sleep(1.0)  # retries meanwhile meet the full disk
        assert "behind the journal" in ix.failure and "catches up by itself" in ix.failure
        full["on"] = False
        deadline = time.monotonic() + 15
        while ix.failure is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ix.failure is None
        assert ix.get_track("t2").content_sha256 == "2"
    assert_tracks(path, [0, 1, 2])


def test_a_write_while_the_catalog_lags_does_not_skip_the_records_it_missed(tmp_path, monkeypatch):
    """The write after a failed catalog write, with no read between: the catalog applies the
    missed record (a replace: same track count, so no reopen would notice) before the new one."""
    path = tmp_path / "idx"
    build(path, n=2)
    with open_index(path, IDENTITY) as ix:
        real = Catalog.apply_many
        full = {"on": True}

        def apply_many(self, records):
            if full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return real(self, records)

        monkeypatch.setattr(Catalog, "apply_many", apply_many)
        ix.replace_track(TrackRecord("t1", title="new", content_sha256="new"), *vectors_of(7))
        full["on"] = False
        ix.add_track(TrackRecord("t2", content_sha256="2"), *vectors_of(2))
        assert ix.failure is None
        assert ix.get_track("t1").title == "new"
    with open_index(path, IDENTITY) as ix:
        assert ix.get_track("t1").title == "new" and ix.get_track("t2") is not None


def test_closing_stops_the_catch_up_retries(tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build(path, n=2)
    ix = open_index(path, IDENTITY)

    def apply_many(self, records):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "apply_many", apply_many)
    ix.add_track(TrackRecord("t2", content_sha256="2"), *vectors_of(2))
    assert ix.failure is not None
    ix.close()
    assert not [t for t in threading.enumerate() if t.name == "refrain-catalog-catch-up"]
    monkeypatch.undo()
    assert_tracks(path, [0, 1, 2])  # the next open catches the catalog up


@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_a_lost_journal_is_refused_not_rebuilt_around(tmp_path, loss):
    """8 tracks in the snapshot, 4 only in the journal: with the journal deleted or cut to its
    header, the catalog still knows writes past the snapshot. Rebuilding the catalog from the
    snapshot would silently drop the 4 acknowledged tracks; recovery refuses instead, names
    the files, changes nothing, and opens as before once the journal is restored."""
    path = tmp_path / "idx"
    build(path, n=12, snapshot_after=8)
    journal = path / "journal.log"
    kept = journal.read_bytes()
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    if loss == "deleted":
        journal.unlink()
    else:
        journal.write_bytes(kept[:16])
    with pytest.raises(CorruptIndexError, match=r"journal.log .*catalog.sqlite.*seq 12.*lost"):
        open_index(path, IDENTITY)
    assert journal.exists() == (loss == "emptied")  # no empty journal left in its place
    assert snapshot_files(path)  # the snapshot is untouched
    after = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    assert after.get("catalog.sqlite") == before["catalog.sqlite"]
    journal.write_bytes(kept)  # restored from a backup
    assert_tracks(path, sorted(range(12), key=str))  # ids in the catalog's order
