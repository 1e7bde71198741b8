"""Track metadata in SQLite: a queryable catalog derived from the journal.

The catalog is not a source of truth. Each write is applied to it after its journal record is
durable, in one transaction that also stores the record's sequence number (`applied_seq`), so
replaying the journal into it is idempotent: records with `seq <= applied_seq` are skipped.
When the catalog is missing, unreadable, damaged (`PRAGMA quick_check` at open, or a corruption
error where a query meets it), or behind the snapshot (its records already dropped from the
journal), it is rebuilt from the snapshot's track list and the journal.

A track's segments have the contiguous ids `first_segment_id .. first_segment_id + n_segments
- 1`; together with the start times kept beside the vectors, that is the segment -> (track,
start) mapping.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .journal import Op, Record
from .types import TrackRecord, stored_sequence

log = logging.getLogger(__name__)

# SQLite's primary result codes for a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB); other
# errors (disk full, I/O, locked) say nothing about the file's contents.
_DAMAGE_CODES = (11, 26)


def is_damage(error: sqlite3.Error) -> bool:
    """True when `error` says the database file itself is damaged or is not a database."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # raised by Python's module itself, before SQLite said anything
        return type(error) is sqlite3.DatabaseError
    return code & 0xFF in _DAMAGE_CODES


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracks (
    track_id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    artist TEXT NOT NULL,
    work_id TEXT,
    duration_s REAL,
    content_sha256 TEXT,
    n_segments INTEGER NOT NULL,
    first_segment_id INTEGER NOT NULL,
    added_at REAL NOT NULL,
    sequence BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tracks_work_id ON tracks (work_id);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

_COLUMNS = (
    "track_id",
    "title",
    "artist",
    "work_id",
    "duration_s",
    "content_sha256",
    "n_segments",
    "added_at",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM tracks"
_INSERT = (
    f"INSERT OR REPLACE INTO tracks ({', '.join(_COLUMNS)}, first_segment_id, sequence) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})"
)


def _row(meta: dict[str, Any], first_segment_id: int) -> tuple[Any, ...]:
    return (
        meta["track_id"],
        meta.get("title") or "",
        meta.get("artist") or "",
        meta.get("work_id"),
        meta.get("duration_s"),
        meta.get("content_sha256"),
        meta["n_segments"],
        meta["added_at"],
        first_segment_id,
        stored_sequence(meta.get("sequence")),
    )


class Catalog:
    """One SQLite connection (WAL, synchronous=FULL) shared by the index's threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(tracks)")}
            if "sequence" not in columns:  # a catalog from before sequences were stored
                db.execute("ALTER TABLE tracks ADD COLUMN sequence BLOB")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    @classmethod
    def open_or_reset(cls, path: Path) -> tuple[Catalog, bool]:
        """Open the catalog; a file that is unreadable or fails SQLite's `quick_check` (page
        damage a plain query may only meet later) is deleted and recreated empty (returns
        True): it is derived data, rebuilt by the caller."""
        catalog = None
        try:
            catalog = cls(path)
            problems = catalog.check()
            if not problems:
                catalog.applied_seq()
                return catalog, False
            log.warning("%s is damaged (%s); it will be rebuilt", path, "; ".join(problems[:3]))
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            log.warning("%s is unreadable (%s); it will be rebuilt", path, e)
        if catalog is not None:
            catalog.close()
        return cls.reset(path), True

    @classmethod
    def reset(cls, path: Path) -> Catalog:
        """Delete the catalog's files and create it empty."""
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return cls(path)

    def check(self) -> list[str]:
        """SQLite's `quick_check` (every page and b-tree, not index contents): [] when sound."""
        with self._mutex:
            rows = self._db.execute("PRAGMA quick_check").fetchall()
        found = [str(r[0]) for r in rows]
        return [] if found == ["ok"] else found

    def applied_seq(self) -> int:
        with self._mutex:
            row = self._db.execute("SELECT value FROM state WHERE key='applied_seq'").fetchone()
        return 0 if row is None else int(row[0])

    def _set_seq(self, seq: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES ('applied_seq', ?)", (seq,)
        )

    def apply(self, record: Record) -> None:
        """Apply one journal record (skipped if already applied), atomically with its seq."""
        self.apply_many([record])

    def apply_many(self, records: list[Record]) -> None:
        """Apply journal records in seq order (those already applied are skipped) in one
        transaction, with the last seq."""
        with self._mutex:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM state WHERE key='applied_seq'").fetchone()
                applied = -1 if row is None else int(row[0])
                todo = [r for r in records if r.seq > applied]
                if not todo:
                    db.execute("ROLLBACK")
                    return
                for record in todo:
                    if record.op is Op.DELETE:
                        db.execute("DELETE FROM tracks WHERE track_id = ?", (record.track_id,))
                    else:  # ADD or REPLACE: the row is the whole new state of the track
                        db.execute(_INSERT, _row(record.meta, record.first_segment_id))
                self._set_seq(todo[-1].seq)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite itself rolls back on some errors (disk full)
                    db.execute("ROLLBACK")
                raise

    def rebuild(self, rows: Iterable[tuple[dict[str, Any], int]], seq: int) -> None:
        """Replace every row with `rows` ((track json, first_segment_id) pairs) at `seq`."""
        with self._mutex:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM tracks")
                db.executemany(_INSERT, (_row(meta, first) for meta, first in rows))
                self._set_seq(seq)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite itself rolls back on some errors (disk full)
                    db.execute("ROLLBACK")
                raise

    def get(self, track_id: str) -> TrackRecord | None:
        with self._mutex:
            row = self._db.execute(_SELECT + " WHERE track_id = ?", (track_id,)).fetchone()
        return None if row is None else TrackRecord(*row)

    def page(self, limit: int, after: str | None) -> list[TrackRecord]:
        with self._mutex:
            if after is None:
                rows = self._db.execute(_SELECT + " ORDER BY track_id LIMIT ?", (limit,))
            else:
                rows = self._db.execute(
                    _SELECT + " WHERE track_id > ? ORDER BY track_id LIMIT ?", (after, limit)
                )
            return [TrackRecord(*row) for row in rows.fetchall()]

    def sequences(self, track_ids: list[str]) -> dict[str, bytes]:
        """The stored sequences of those of `track_ids` that have one."""
        out: dict[str, bytes] = {}
        with self._mutex:
            for i in range(0, len(track_ids), 500):  # under SQLite's host-parameter limit
                part = track_ids[i : i + 500]
                rows = self._db.execute(
                    "SELECT track_id, sequence FROM tracks WHERE sequence IS NOT NULL "
                    f"AND track_id IN ({', '.join('?' * len(part))})",
                    part,
                )
                out.update((tid, bytes(seq)) for tid, seq in rows)
        return out

    def dump(self) -> Iterator[tuple[dict[str, Any], int]]:
        """Every track as (stored json, first_segment_id), by track id. Caller excludes
        writers."""
        with self._mutex:
            rows = self._db.execute(
                _SELECT.replace(" FROM", ", first_segment_id, sequence FROM") + " ORDER BY track_id"
            ).fetchall()
        for row in rows:
            record = replace(TrackRecord(*row[:-2]), sequence=row[-1] and bytes(row[-1]))
            yield record.to_stored(), int(row[-2])

    def count(self) -> int:
        with self._mutex:
            return int(self._db.execute("SELECT count(*) FROM tracks").fetchone()[0])

    def close(self) -> None:
        with self._mutex:
            self._db.close()
