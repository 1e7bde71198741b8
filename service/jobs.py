"""Bulk ingestion jobs: created durably, processed in order by worker threads.

Durability. A job is acknowledged (202) only after its files are written and fsynced under
`jobs_dir/<job_id>/files/` and its rows are committed to the job database (`jobstore`), so an
acknowledged job survives a crash. An item is marked final only after
the engine's `ingest_item` returned, when the index write is already durable; its stored file
is deleted after that mark, and the job's folder once the job is final.

Restart. `start()` resumes every queued or running job: items still pending are processed
again. A crash between an index write and the item's 'done' mark leaves the item pending;
adding a reference is idempotent on (track id, content), so the redo finds the track stored and
the item ends 'skipped' instead of 'done'. No track is ever added twice.

Outcomes. ADDED/REPLACED -> 'done', UNCHANGED -> 'skipped' (ingesting a catalog twice adds
nothing twice), a per-item error (bad audio, track exists with other content...) -> 'failed'
with the API error code and message, and the job goes on. A job ends 'done' once every item is
final: 'failed' when every item failed, else 'done' with its count of failed items
(`counts.failed`), and 'failed' at once when the index itself refuses writes (the remaining
items fail with it). `GET /v1/jobs` lists jobs newest first, by state if asked.
Transient failures (overload, not ready, a backend or the workers down) are retried; an item
in progress at `stop()` is finished or abandoned, and then redone after the restart.

Damage. A job database that cannot be read at start-up is set aside with the folders of its
jobs and a new one started (`jobs_folder`); damage met while running takes ingestion down
(`failure`: 503 `jobs_unavailable`, `/readyz` degraded) until a restart sets it aside.

Retention. Finished jobs (done or failed) are deleted, rows and any files left, once they
ended more than `job_retention_hours` ago: at start-up and then every hour. A purged job is
unknown (404), as if it never existed; queued and running jobs are never purged.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refrain.index import (
    AddResult,
    CatalogUnavailableError,
    IdentityMismatchError,
    InsufficientStorageError,
    SegmentIndexError,
    TrackExistsError,
    TrackNotFoundError,
)
from refrain.index.files import fsync_dir
from refrain.service.errors import Unavailable, as_domain_error
from refrain.service.jobs_folder import DATABASE, open_job_store, sweep
from refrain.service.jobstore import ItemState, JobState, JobStore
from refrain.service.metrics import Metrics
from refrain.service.settings import Settings
from refrain.service.sources import Item

log = logging.getLogger("refrain.jobs")

Ingest = Callable[[Item, bool], AddResult]  # (item, replace) -> what the index did

RETRY_DELAY_S = 1.0  # after a transient failure (overloaded, not ready)
IDLE_WAIT_S = 5.0  # a waiting worker re-checks for work at least this often
STOP_TIMEOUT_S = 30.0  # wait this long for the items in progress at stop()
PURGE_EVERY_S = 3600.0  # look for finished jobs past their retention this often


@dataclass(frozen=True)
class Staging:
    job_id: str
    files: Path  # where the job's uploaded or extracted files go before the job is created


@dataclass(frozen=True)
class _Claim:
    job_id: str
    position: int
    item: Item
    replace: bool


class JobManager:
    """Creates jobs, runs them on `settings.ingest_workers` threads, reports on them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        ingest: Ingest,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.metrics = metrics
        self.ingest = ingest  # one item into the index (the engine's `ingest_item`)
        self.ready = ready  # resumed jobs wait until this says the engine is up
        self.dir: Path = settings.jobs_dir
        self.n_workers: int = settings.ingest_workers
        self.retention_s: float = settings.job_retention_hours * 3600  # 0: keep forever
        self.store: JobStore | None = None
        self._wake = threading.Condition()
        self._generation = 0  # bumped on every new job, so a waiting worker never misses one
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claims = threading.Lock()
        self._claimed: set[tuple[str, int]] = set()  # items in progress
        self._runs: dict[str, list[float]] = {}  # job -> [first claim, items final] this run

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the job database (setting a damaged one aside), clean up leftovers, resume
        unfinished jobs."""
        self.store = open_job_store(self.dir)
        sweep(self.dir, self.store)
        self.purge()
        self._stop.clear()
        targets = [(self._run, f"refrain-ingest-{n}") for n in range(self.n_workers)]
        if self.retention_s > 0:
            targets.append((self._purge_periodically, "refrain-jobs-purge"))
        for target, name in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the workers: an item in progress finishes or is abandoned (redone later)."""
        self._stop.set()
        self._notify()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s still busy at shutdown; its item will be redone", t.name)
        self._threads.clear()
        if self.store is not None:
            self.store.close()

    @property
    def database(self) -> Path:
        return self.dir / DATABASE

    @property
    def failure(self) -> str | None:
        """Why the open job database cannot serve (damage met while running); None: it can."""
        return self.store.damage if self.store is not None else None

    def purge(self, now: float | None = None) -> int:
        """Delete the jobs that finished more than the retention period before `now` (default:
        the current time), with whatever files of theirs are still on disk; returns how many."""
        if self.retention_s <= 0:
            return 0
        now = time.time() if now is None else now
        purged = self._store().purge(now - self.retention_s)
        for job_id in purged:
            shutil.rmtree(self.dir / job_id, ignore_errors=True)
        if purged:
            self.metrics.ingest_jobs_purged.inc(len(purged))
            log.info(
                "purged %d jobs finished more than %g h ago", len(purged), self.retention_s / 3600
            )
        return len(purged)

    def _purge_periodically(self) -> None:
        while not self._stop.wait(PURGE_EVERY_S):
            try:
                self.purge()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("purging finished jobs failed")

    # -- creating and reporting ----------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Staging]:
        """A fresh job folder for the request's files; removed if the job is not created."""
        job_id = uuid.uuid4().hex
        files = self.dir / job_id / "files"
        files.mkdir(parents=True)
        try:
            yield Staging(job_id, files)
        except BaseException:
            shutil.rmtree(self.dir / job_id, ignore_errors=True)
            raise

    def create(
        self,
        staging: Staging,
        items: list[Item],
        source: str,
        ignored: int = 0,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Commit a job whose files are in `staging` (each fsynced) and queue it."""
        for d in (staging.files, staging.files.parent, self.dir):
            fsync_dir(d)
        self._store().insert(staging.job_id, items, source, ignored, replace)
        self._notify()
        return {
            "job_id": staging.job_id,
            "state": JobState.QUEUED.value,
            "total": len(items),
            "ignored": ignored,
        }

    def get(self, job_id: str, items: bool = False) -> dict[str, Any] | None:
        """State, counts, progress, ETA (seconds, from this run's rate), item errors, and with
        `items` every item's state; None for an unknown job."""
        job = self._store().report(job_id, items)
        if job is None:
            return None
        pending = job["counts"]["pending"]
        run = self._runs.get(job_id)
        eta = None
        if pending and run and run[1] > 0:
            eta = round(pending * (time.time() - run[0]) / run[1], 1)
        return {**job, "progress": _progress(job["counts"]), "eta_s": eta}

    def page(
        self, limit: int = 50, cursor: str | None = None, state: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs newest first, with their counts and progress; and the next page's cursor."""
        jobs, next_cursor = self._store().page(limit, cursor, state)
        for job in jobs:
            job["progress"] = _progress(job["counts"])
        return jobs, next_cursor

    def _store(self) -> JobStore:
        if self.store is None:
            raise Unavailable("not_ready", "the job store is not open")
        return self.store

    def _notify(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    # -- workers -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.ready():  # resumed jobs wait for the model and index
                self._stop.wait(0.1)
                continue
            if self.failure is not None:  # reported by /readyz and every jobs request
                self._stop.wait(IDLE_WAIT_S)
                continue
            with self._wake:
                generation = self._generation
            try:
                claim = self._claim()
                if claim is not None:
                    self._process(claim)
                    continue
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("ingestion worker error")
                self._stop.wait(RETRY_DELAY_S)
                continue
            with self._wake:
                if self._generation == generation and not self._stop.is_set():
                    self._wake.wait(IDLE_WAIT_S)

    def _claim(self) -> _Claim | None:
        with self._claims:
            found = self._store().next_pending(self._claimed)
            if found is None:
                return None
            job_id, pos, item, replace = found
            self._claimed.add((job_id, pos))
            self._runs.setdefault(job_id, [time.time(), 0])
        return _Claim(job_id, pos, item, replace)

    def _release(self, claim: _Claim) -> None:
        with self._claims:
            self._claimed.discard((claim.job_id, claim.position))

    def _process(self, claim: _Claim) -> None:
        try:
            try:
                result = self.ingest(claim.item, claim.replace)
            except Exception as e:  # noqa: BLE001 - sorted below: retry, job failure, item failure
                if self._stop.is_set() or _transient(e):  # stays pending: redone later
                    self._stop.wait(RETRY_DELAY_S)
                elif _index_failure(e):
                    log.error("job %s failed: %s", claim.job_id, e)
                    self._store().fail(claim.job_id, f"the index refused the write: {e}")
                    self._close_job(claim.job_id)
                else:
                    err = as_domain_error(e)
                    self._finish(claim, ItemState.FAILED, None, err.code, err.message)
                return
            skipped = result is AddResult.UNCHANGED
            self._finish(claim, ItemState.SKIPPED if skipped else ItemState.DONE, result.value)
        finally:
            self._release(claim)

    def _finish(
        self,
        claim: _Claim,
        state: ItemState,
        result: str | None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        job_done = self._store().finish(claim.job_id, claim.position, state, result, code, message)
        run = self._runs.get(claim.job_id)
        if run is not None:
            run[1] += 1
        self.metrics.ingest_items.labels(state.value).inc()
        if claim.item.owned:
            claim.item.path.unlink(missing_ok=True)
        if job_done:
            self._close_job(claim.job_id)

    def _close_job(self, job_id: str) -> None:
        shutil.rmtree(self.dir / job_id, ignore_errors=True)
        self._runs.pop(job_id, None)


def _progress(counts: dict[str, int]) -> float:
    """Share of a job's items that are final (1.0 for an empty job)."""
    total = counts["total"]
    return round((total - counts["pending"]) / total, 4) if total else 1.0


def _transient(e: Exception) -> bool:
    """Errors that say 'later', not 'never': overload, not-ready, a catalog catching up, a
    backend or the inference workers down for a while."""
    return as_domain_error(e).transient


def _index_failure(e: Exception) -> bool:
    """The index refuses writes altogether (closed or failed), as opposed to this one item
    (a full disk fails the item, 507, as the free-space guard does: the index stays usable)."""
    return isinstance(e, SegmentIndexError) and not isinstance(
        e,
        (
            TrackExistsError,
            TrackNotFoundError,
            IdentityMismatchError,
            InsufficientStorageError,
            CatalogUnavailableError,
        ),
    )
