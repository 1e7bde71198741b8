"""The jobs folder on disk: its database opened, set aside when it cannot be read, reported
when it is lost; and what a crash left in the folder removed.

Damage. A job database that cannot be read at start-up (cut short, damaged pages, not a
database: SQLite's `quick_check` reads every page) is set aside, not deleted: it moves, with
its WAL files and the folders of the jobs it held, to `<jobs folder>/corrupt-<UTC time>/`,
where the relative paths it records still resolve; a WARNING names the new place, and a new
empty database takes its place so that ingestion works again. The old jobs are forgotten (404).
Damage first met while running is the job store's to report (`JobStore.damage`) until a
restart sets the file aside here.

Loss. A jobs folder without its database (deleted by hand) starts with a new empty one, and a
WARNING says that the job history is lost; the folders of its unfinished jobs are then removed
as leftovers, like those of jobs never committed.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from refrain.index.files import fsync_dir
from refrain.service.jobstore import JOB_ID, DamagedJobDatabase, JobStore

log = logging.getLogger("refrain.jobs")

DATABASE = "jobs.sqlite"


def open_job_store(folder: Path) -> JobStore:
    """The job database of `folder` (created with it when new); a damaged one is set aside
    and a new one started, a missing one is reported: either way that history is lost."""
    database = folder / DATABASE
    if not folder.is_dir():  # a new folder: its database is created now, with it
        folder.mkdir(parents=True)
        fsync_dir(folder.parent)
    elif not database.exists():
        log.warning(
            "the job database %s is missing from an existing jobs folder (%d job folders in "
            "it): the job history is lost, and a new empty one is started; to keep it, stop "
            "the service and restore %s from a backup",
            database,
            len(job_folders(folder)),
            DATABASE,
        )
    try:
        return JobStore(database)
    except DamagedJobDatabase as e:
        aside = set_aside(folder)
        log.warning(
            "%s; moved it to %s with the folders of its jobs, and started a new job database: "
            "earlier jobs are forgotten",
            e,
            aside / DATABASE,
        )
    return JobStore(database)


def job_folders(folder: Path) -> list[Path]:
    """The folders of jobs (named by their job id) in the jobs folder."""
    return [d for d in folder.iterdir() if d.is_dir() and JOB_ID.match(d.name)]


def set_aside(folder: Path) -> Path:
    """Move the job database, its WAL files and the job folders to a new folder
    `corrupt-<UTC time>` inside `folder`; returns that folder."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = folder / f"corrupt-{stamp}", 1
    while aside.exists():
        aside, n = folder / f"corrupt-{stamp}-{n}", n + 1
    aside.mkdir()
    for suffix in ("", "-wal", "-shm"):
        name = DATABASE + suffix
        if (folder / name).exists():
            (folder / name).rename(aside / name)
    for job in job_folders(folder):
        job.rename(aside / job.name)
    fsync_dir(aside)
    fsync_dir(folder)
    return aside


def sweep(folder: Path, store: JobStore) -> None:
    """Remove what a crash may have left: folders of jobs never committed or already final,
    and stored files of final items."""
    active, files = store.leftovers()
    for job in job_folders(folder):
        if job.name not in active:
            shutil.rmtree(job, ignore_errors=True)
    for f in files:
        f.unlink(missing_ok=True)
