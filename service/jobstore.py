"""The bulk ingestion job database: `jobs_dir/jobs.sqlite` (WAL, synchronous=FULL).

One connection, shared by the HTTP threads and the ingestion workers under a lock; every
write is one transaction, durable when it returns. Items are addressed by (job id, position);
a stored file's path is kept relative to the jobs folder, a user's file (ingested by path)
absolute.

A file that is not a readable database (cut short, damaged pages, not SQLite at all) is
refused at open with `DamagedJobDatabase` (SQLite's `quick_check` reads every page), and
`jobs_folder` sets it aside; damage first met while open is kept in `damage`, and every call
answers 503 `jobs_unavailable` naming the file until a restart sets it aside.
"""

from __future__ import annotations

import enum
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refrain.index.catalog import is_damage
from refrain.service.errors import Unavailable
from refrain.service.sources import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,            -- queued | running | done | failed
    source TEXT NOT NULL,           -- files | archive | path
    replace_existing INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL,
    ignored INTEGER NOT NULL DEFAULT 0,   -- non-audio files left out of the job
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    position INTEGER NOT NULL,
    filename TEXT NOT NULL,
    path TEXT NOT NULL,             -- relative to the jobs folder when owned, else absolute
    owned INTEGER NOT NULL,         -- 1: a copy stored for the job, deleted once final
    track_id TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    artist TEXT NOT NULL DEFAULT '',
    work_id TEXT,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | done | failed | skipped
    result TEXT,                    -- added | replaced | unchanged
    error_code TEXT,
    error_message TEXT,
    finished REAL,
    PRIMARY KEY (job_id, position)
);
CREATE INDEX IF NOT EXISTS items_pending ON items(job_id, position) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(created) WHERE state IN ('queued', 'running');
"""

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ItemState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class DamagedJobDatabase(Exception):
    """The job database cannot be read: cut short, damaged pages, or not a database."""


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent  # owned item paths are relative to it
        self.damage: str | None = None  # why the open database stopped answering, if it did
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            rows = db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as e:
            db.close()
            if is_damage(e):
                raise DamagedJobDatabase(f"{path} cannot be read: {e}") from e
            raise
        problems = [str(r[0]) for r in rows]
        if problems != ["ok"]:
            db.close()
            raise DamagedJobDatabase(f"{path} is damaged: {'; '.join(problems[:3])}")
        self._db: sqlite3.Connection | None = db
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise Unavailable("not_ready", "the job store is closed")
            if self.damage is not None:
                raise Unavailable("jobs_unavailable", self.damage, retry_after_s=None)
            try:
                yield self._db
            except sqlite3.DatabaseError as e:
                if not is_damage(e):
                    raise
                self.damage = (
                    f"the job database {self.path} is damaged ({e}); restart the service to "
                    "set it aside and start a new one, or restore it from a backup"
                )
                raise Unavailable("jobs_unavailable", self.damage, retry_after_s=None) from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite itself rolls back on some errors (disk full)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- jobs ----------------------------------------------------------------------------------

    def insert(
        self, job_id: str, items: list[Item], source: str, ignored: int, replace: bool
    ) -> None:
        rows = [
            (
                job_id,
                n,
                it.filename,
                str(it.path.relative_to(self.base)) if it.owned else str(it.path),
                int(it.owned),
                it.track_id,
                it.title or "",
                it.artist or "",
                it.work_id or None,
            )
            for n, it in enumerate(items)
        ]
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, state, source, replace_existing, total, ignored, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, JobState.QUEUED, source, int(replace), len(items), ignored, time.time()),
            )
            db.executemany(
                "INSERT INTO items (job_id, position, filename, path, owned, track_id, title, "
                "artist, work_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def report(self, job_id: str, items: bool = False) -> dict[str, Any] | None:
        """A job's row, its item counts by state, its failed items (and every item)."""
        if not JOB_ID.match(job_id):
            return None
        with self._read() as db:
            row = db.execute(
                "SELECT state, source, total, ignored, created, started, finished, error "
                "FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                return None
            by_state = dict(
                db.execute(
                    "SELECT state, count(*) FROM items WHERE job_id = ? GROUP BY state", (job_id,)
                )
            )
            failed = db.execute(
                "SELECT filename, track_id, error_code, error_message FROM items "
                "WHERE job_id = ? AND state = 'failed' ORDER BY position",
                (job_id,),
            ).fetchall()
            every = (
                db.execute(
                    "SELECT filename, track_id, state, result FROM items WHERE job_id = ? "
                    "ORDER BY position",
                    (job_id,),
                ).fetchall()
                if items
                else None
            )
        state, source, total, ignored, created, started, finished, error = row
        out = {
            "job_id": job_id,
            "state": state,
            "source": source,
            "counts": {"total": total, **{s.value: by_state.get(s.value, 0) for s in ItemState}},
            "ignored": ignored,
            "created": created,
            "started": started,
            "finished": finished,
            "error": error,
            "errors": [
                {"filename": f, "track_id": t, "code": c, "message": m} for f, t, c, m in failed
            ],
        }
        if every is not None:
            out["items"] = [
                {"filename": f, "track_id": t, "state": s, "result": r} for f, t, s, r in every
            ]
        return out

    def page(
        self, limit: int, cursor: str | None = None, state: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs newest first (by creation), at most `limit`, after `cursor` (the last job id
        of the previous page), optionally in one `state`; and the next page's cursor."""
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        with self._read() as db:
            if cursor is not None:
                row = db.execute("SELECT created FROM jobs WHERE id = ?", (cursor,)).fetchone()
                if row is None:
                    return [], None
                where.append("(created < ? OR (created = ? AND id < ?))")
                args += [row[0], row[0], cursor]
            sql = (
                "SELECT id, state, source, total, ignored, created, started, finished, error "
                "FROM jobs"
                + (" WHERE " + " AND ".join(where) if where else "")
                + " ORDER BY created DESC, id DESC LIMIT ?"
            )
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
            counts = {}
            for job_id, *_ in rows[:limit]:
                counts[job_id] = dict(
                    db.execute(
                        "SELECT state, count(*) FROM items WHERE job_id = ? GROUP BY state",
                        (job_id,),
                    ).fetchall()
                )
        jobs = [
            {
                "job_id": job_id,
                "state": st,
                "source": source,
                "ignored": ignored,
                "created": created,
                "started": started,
                "finished": finished,
                "error": error,
                "counts": {
                    "total": total,
                    **{s.value: counts[job_id].get(s.value, 0) for s in ItemState},
                },
            }
            for job_id, st, source, total, ignored, created, started, finished, error in rows[
                :limit
            ]
        ]
        return jobs, (jobs[-1]["job_id"] if len(rows) > limit else None)

    def leftovers(self) -> tuple[set[str], list[Path]]:
        """Ids of unfinished jobs, and stored files of their items that are already final."""
        with self._read() as db:
            active = {
                r[0] for r in db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")
            }
            paths = [
                self.base / r[0]
                for r in db.execute(
                    "SELECT i.path FROM items i JOIN jobs j ON j.id = i.job_id WHERE i.owned = 1 "
                    "AND i.state != 'pending' AND j.state IN ('queued', 'running')"
                )
            ]
        return active, paths

    def purge(self, finished_before: float) -> list[str]:
        """Delete the jobs that ended (done or failed) before `finished_before` (epoch
        seconds), with their items; returns their ids. Queued and running jobs are kept."""
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state IN ('done', 'failed') AND finished < ?",
                    (finished_before,),
                )
            ]
            rows = [(i,) for i in ids]
            db.executemany("DELETE FROM items WHERE job_id = ?", rows)
            db.executemany("DELETE FROM jobs WHERE id = ?", rows)
        return ids

    # -- items ---------------------------------------------------------------------------------

    def next_pending(self, skip: set[tuple[str, int]]) -> tuple[str, int, Item, bool] | None:
        """The first pending item in job order not in `skip`, as (job, position, item,
        replace); its job becomes running."""
        with self._read() as db:
            jobs = db.execute(
                "SELECT id, state, replace_existing FROM jobs "
                "WHERE state IN ('queued', 'running') ORDER BY created, id"
            ).fetchall()
            for job_id, state, replace in jobs:
                rows = db.execute(
                    "SELECT position, filename, path, owned, track_id, title, artist, work_id "
                    "FROM items WHERE job_id = ? AND state = 'pending' ORDER BY position "
                    "LIMIT ?",
                    (job_id, len(skip) + 1),
                ).fetchall()
                for pos, filename, path, owned, track_id, title, artist, work_id in rows:
                    if (job_id, pos) in skip:
                        continue
                    if state == JobState.QUEUED:
                        db.execute(
                            "UPDATE jobs SET state = 'running', started = COALESCE(started, ?) "
                            "WHERE id = ?",
                            (time.time(), job_id),
                        )
                    full = self.base / path if owned else Path(path)
                    item = Item(filename, full, bool(owned), track_id, title, artist, work_id)
                    return job_id, pos, item, bool(replace)
        return None

    def finish(
        self,
        job_id: str,
        position: int,
        state: ItemState,
        result: str | None,
        code: str | None = None,
        message: str | None = None,
    ) -> bool:
        """Mark an item final; True when that made its job done."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE items SET state = ?, result = ?, error_code = ?, error_message = ?, "
                "finished = ? WHERE job_id = ? AND position = ?",
                (state, result, code, message, now, job_id, position),
            )
            if db.execute(
                "SELECT 1 FROM items WHERE job_id = ? AND state = 'pending' LIMIT 1", (job_id,)
            ).fetchone():
                return False
            # every item failed: the job failed; otherwise done (with its failed count)
            succeeded = db.execute(
                "SELECT 1 FROM items WHERE job_id = ? AND state != 'failed' LIMIT 1", (job_id,)
            ).fetchone()
            final, error = (
                ("done", None) if succeeded else ("failed", "every item failed (see errors)")
            )
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = COALESCE(error, ?) "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (final, now, error, job_id),
            )
            return True

    def fail(self, job_id: str, error: str) -> None:
        """End a job as failed; its pending items fail with it."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE items SET state = 'failed', error_code = 'job_failed', "
                "error_message = ?, finished = ? WHERE job_id = ? AND state = 'pending'",
                (error, now, job_id),
            )
            db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                (now, error, job_id),
            )
