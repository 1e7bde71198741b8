"""The Milvus backend's local state: track metadata, segment starts and write bookkeeping.

Milvus holds the vectors; this SQLite file beside it is the source of truth for which tracks
exist. It extends the FAISS store's catalog (same `tracks` table, same paging) with:

- `starts`: each track's segment start seconds (float64 blob); a track's segments have the
  contiguous ids `first_segment_id .. first_segment_id + n_segments - 1`;
- `pending`: id ranges reserved by a write whose Milvus insert may have happened but which was
  never committed here (deleted from Milvus at the next open);
- `garbage`: id ranges of deleted or replaced tracks still to be deleted from Milvus;
- `state`: `applied_seq` (writes committed), `next_segment_id`, `snapshot_seq`.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from .catalog import _INSERT, Catalog, _row

T = TypeVar("T")

_EXTRA_SCHEMA = """
CREATE TABLE IF NOT EXISTS starts (track_id TEXT PRIMARY KEY, starts BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (first_id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS garbage (first_id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
"""

Range = tuple[int, int]  # (first segment id, number of segments)


class MilvusCatalog(Catalog):
    """One SQLite connection; every method is one transaction."""

    def _connect(self) -> sqlite3.Connection:
        db = super()._connect()
        db.executescript(_EXTRA_SCHEMA)
        return db

    def _state(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _put_state(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def state(self, key: str) -> int:
        with self._mutex:
            return self._state(key)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._mutex:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                out = work(db)
                db.execute("COMMIT")
                return out
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def reserve(self, n: int) -> int:
        """A fresh range of `n` segment ids, recorded as pending; returns its first id."""

        def work(db: sqlite3.Connection) -> int:
            first = self._state("next_segment_id")
            self._put_state("next_segment_id", first + n)
            db.execute("INSERT INTO pending (first_id, n) VALUES (?, ?)", (first, n))
            return first

        return self._transaction(work)

    def commit_track(
        self, seq: int, meta: dict[str, Any], first: int, starts: np.ndarray, old: Range | None
    ) -> None:
        """The commit point of an add or replace: the track row, its starts, the old range
        to garbage, the pending range dropped, `applied_seq` = seq."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(_INSERT, _row(meta, first))
            db.execute(
                "INSERT OR REPLACE INTO starts (track_id, starts) VALUES (?, ?)",
                (meta["track_id"], np.asarray(starts, "<f8").tobytes()),
            )
            if old is not None:
                db.execute("INSERT OR REPLACE INTO garbage (first_id, n) VALUES (?, ?)", old)
            db.execute("DELETE FROM pending WHERE first_id = ?", (first,))
            self._put_state("applied_seq", seq)

        self._transaction(work)

    def commit_delete(self, seq: int, track_id: str, old: Range) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM tracks WHERE track_id = ?", (track_id,))
            db.execute("DELETE FROM starts WHERE track_id = ?", (track_id,))
            db.execute("INSERT OR REPLACE INTO garbage (first_id, n) VALUES (?, ?)", old)
            self._put_state("applied_seq", seq)

        self._transaction(work)

    def set_snapshot_seq(self, seq: int) -> None:
        self._transaction(lambda db: self._put_state("snapshot_seq", seq))

    def leftovers(self) -> list[tuple[str, int, int]]:
        """Ranges still to delete from Milvus: ("pending" | "garbage", first id, n)."""
        with self._mutex:
            rows = [("pending", *r) for r in self._db.execute("SELECT first_id, n FROM pending")]
            rows += [("garbage", *r) for r in self._db.execute("SELECT first_id, n FROM garbage")]
        return rows

    def forget(self, table: str, first: int) -> None:
        if table not in ("pending", "garbage"):
            raise ValueError(f"table must be pending or garbage, got {table!r}")
        self._transaction(
            lambda db: db.execute(f"DELETE FROM {table} WHERE first_id = ?", (first,))
        )

    def spans(self) -> Iterator[tuple[str, int, np.ndarray]]:
        """(track id, first segment id, starts) of every track, by first segment id."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT t.track_id, t.first_segment_id, s.starts FROM tracks t "
                "JOIN starts s ON s.track_id = t.track_id ORDER BY t.first_segment_id"
            ).fetchall()
        for track_id, first, blob in rows:
            yield track_id, int(first), np.frombuffer(blob, "<f8").astype(np.float64)


class Spans:
    """In memory: segment id -> (track, start), for the live tracks. Not thread-safe.

    Ids are handed out in increasing order, so spans are appended in order; a removed track
    leaves a hole (owner None) that is skipped.
    """

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._owners: list[str | None] = []
        self._starts: list[np.ndarray | None] = []
        self._where: dict[str, int] = {}
        self.n_segments = 0
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._where

    def get(self, track_id: str) -> tuple[int, np.ndarray] | None:
        pos = self._where.get(track_id)
        if pos is None:
            return None
        starts = self._starts[pos]
        assert starts is not None  # a live position
        return self._firsts[pos], starts

    def put(self, track_id: str, first: int, starts: np.ndarray) -> None:
        if self._firsts and first <= self._firsts[-1]:
            raise ValueError(f"segment ids must grow: {first} after {self._firsts[-1]}")
        self.remove(track_id)
        self._where[track_id] = len(self._firsts)
        self._firsts.append(first)
        self._owners.append(track_id)
        self._starts.append(np.asarray(starts, np.float64))
        self.n_segments += len(starts)
        self._array = None

    def remove(self, track_id: str) -> Range | None:
        pos = self._where.pop(track_id, None)
        if pos is None:
            return None
        starts = self._starts[pos]
        assert starts is not None
        self._owners[pos] = self._starts[pos] = None
        self.n_segments -= len(starts)
        return self._firsts[pos], len(starts)

    def lookup(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Owner track ids (object) and starts (float64) of `segment_ids`; (None, NaN) if dead."""
        ids = np.asarray(segment_ids, dtype=np.int64)
        owners = np.full(ids.shape, None, dtype=object)
        starts = np.full(ids.shape, np.nan)
        if self._array is None:
            self._array = np.asarray(self._firsts, dtype=np.int64)
        pos = np.searchsorted(self._array, ids.ravel(), side="right") - 1
        for flat, (sid, p) in enumerate(zip(ids.ravel(), pos, strict=True)):
            if p < 0 or self._owners[p] is None:
                continue
            track_starts = self._starts[p]
            offset = int(sid) - self._firsts[p]
            if 0 <= offset < len(track_starts):
                owners.flat[flat] = self._owners[p]
                starts.flat[flat] = track_starts[offset]
        return owners, starts

    def is_live(self, segment_id: int) -> bool:
        p = bisect.bisect_right(self._firsts, segment_id) - 1
        if p < 0 or self._owners[p] is None:
            return False
        starts = self._starts[p]
        return starts is not None and segment_id - self._firsts[p] < len(starts)
