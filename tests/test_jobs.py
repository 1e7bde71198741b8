"""Retention of bulk ingestion jobs: finished jobs past `job_retention_hours` are purged, rows
and files, at start-up, periodically and on demand; queued and running jobs never are. A job
database damaged while running takes ingestion down until a restart sets it aside."""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import pytest
import soundfile as sf

from refrain.service import jobs as jobs_module
from refrain.service.errors import Unavailable
from refrain.service.jobs import JobManager
from refrain.service.jobstore import ItemState
from refrain.service.metrics import Metrics
from refrain.service.settings import Settings
from refrain.service.sources import Item

from conftest import CKPT_A, DATA, LiveServer

HOUR = 3600.0
KEY = {"Authorization": "Bearer k1"}


def manager(data: Path, **kw) -> JobManager:
    """A started JobManager over a real job folder and SQLite store; its engine is never
    ready, so the workers leave every job as the test puts it."""

    def never(item, replace):
        raise AssertionError("a job was processed while the engine was not ready")

    m = JobManager(Settings(data_dir=data, **kw), Metrics(), never, ready=lambda: False)
    m.start()
    return m


def add_job(m: JobManager, n_files: int = 2) -> str:
    """A committed job of `n_files` spooled files, as POST /v1/ingest leaves it."""
    with m.staging() as st:
        items = []
        for n in range(n_files):
            path = st.files / f"{n:06d}.wav"
            path.write_bytes(b"RIFF" + bytes(64))
            items.append(Item(f"f{n}.wav", path, True, f"{st.job_id}-{n}", "", "", None))
        return m.create(st, items, "files")["job_id"]


def sql(data: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(data / "jobs" / "jobs.sqlite") as db:
        return db.execute(query, args).fetchall()


def age(data: Path, job_id: str, hours: float) -> None:
    """Move a job's creation and end `hours` into the past."""
    with sqlite3.connect(data / "jobs" / "jobs.sqlite") as db:
        db.execute(
            "UPDATE jobs SET created = created - ?, finished = finished - ? WHERE id = ?",
            (hours * HOUR, hours * HOUR, job_id),
        )


def spooled(data: Path, job_id: str) -> list[str]:
    folder = data / "jobs" / job_id
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def purged_count(m: JobManager) -> float:
    return m.metrics.registry.get_sample_value("refrain_ingest_jobs_purged_total")


def test_old_finished_jobs_are_purged_at_start_up_and_on_demand(tmp_path):
    data = tmp_path / "data"
    m = manager(data, job_retention_hours=24)
    running = add_job(m)
    assert m.store.next_pending(set())[0] == running  # its first item is claimed: running
    queued = add_job(m)
    old_done, old_failed, recent = add_job(m), add_job(m), add_job(m)
    for job_id in (old_done, recent):
        # items marked final without their files removed: what a crash at that point leaves
        for pos in range(2):
            m.store.finish(job_id, pos, ItemState.DONE, "added")
    m.store.fail(old_failed, "the index refused the write")
    m.stop()
    for job_id in (running, queued, old_done, old_failed):
        age(data, job_id, hours=48)
    age(data, recent, hours=23)
    assert spooled(data, old_done) == ["000000.wav", "000001.wav"]

    m = manager(data, job_retention_hours=24)  # the start-up purge
    try:
        states = dict(sql(data, "SELECT id, state FROM jobs"))
        assert states == {running: "running", queued: "queued", recent: "done"}
        items = {job_id for (job_id,) in sql(data, "SELECT DISTINCT job_id FROM items")}
        assert items == {running, queued, recent}
        for job_id in (old_done, old_failed):
            assert m.get(job_id) is None
            assert not (data / "jobs" / job_id).exists()
        assert spooled(data, queued) == ["000000.wav", "000001.wav"]
        assert spooled(data, running) == ["000000.wav", "000001.wav"]
        assert purged_count(m) == 2

        late = add_job(m)  # finished while this manager runs, its files still there
        for pos in range(2):
            m.store.finish(late, pos, ItemState.DONE, "added")
        assert spooled(data, late) == ["000000.wav", "000001.wav"]
        assert m.purge() == 0  # nothing else is past its retention yet
        # an injected clock a day later: `recent` and `late` are past it, files and all
        assert m.purge(now=time.time() + 25 * HOUR) == 2
        assert m.get(recent) is None and m.get(late) is None
        assert not (data / "jobs" / late).exists()
        assert m.get(running)["state"] == "running" and m.get(queued)["state"] == "queued"
        assert m.purge(now=time.time() + 1000 * HOUR) == 0  # never queued or running jobs
        assert {j for (j,) in sql(data, "SELECT id FROM jobs")} == {running, queued}
        assert spooled(data, queued) == ["000000.wav", "000001.wav"]
        assert purged_count(m) == 4
    finally:
        m.stop()


def test_zero_retention_keeps_every_job(tmp_path):
    data = tmp_path / "data"
    m = manager(data, job_retention_hours=0)
    try:
        job_id = add_job(m, 1)
        m.store.finish(job_id, 0, ItemState.DONE, "added")
        age(data, job_id, hours=10_000)
        assert m.purge(now=time.time() + 10_000 * HOUR) == 0
        assert m.get(job_id)["state"] == "done"
        assert all(t.name != "refrain-jobs-purge" for t in m._threads)
    finally:
        m.stop()


def test_purge_runs_periodically(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "PURGE_EVERY_S", 0.05)
    data = tmp_path / "data"
    m = manager(data, job_retention_hours=1)
    try:
        kept, old = add_job(m, 1), add_job(m, 1)
        for job_id in (kept, old):
            m.store.finish(job_id, 0, ItemState.DONE, "added")
        age(data, old, hours=2)
        deadline = time.monotonic() + 10
        # the purge thread drops the job's row and then its folder: wait for both
        while m.get(old) is not None or (data / "jobs" / old).exists():
            assert time.monotonic() < deadline, "the periodic purge never ran"
            time.sleep(0.05)
        assert m.get(kept)["state"] == "done"
    finally:
        m.stop()
    assert all(not t.is_alive() for t in m._threads)


def test_a_purged_job_answers_404(tmp_path):
    song, sr = sf.read(DATA / "audio" / "song75s.flac", dtype="float32", frames=44100 * 8)
    wav = io.BytesIO()
    sf.write(wav, song, sr, format="WAV")
    server = LiveServer(Settings(data_dir=tmp_path / "data", model=str(CKPT_A), api_keys="k1"))
    try:
        with server.client(headers=KEY) as c:
            r = c.post("/v1/ingest", files=[("files", ("kept.wav", wav.getvalue()))])
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 60
            while c.get(f"/v1/jobs/{job_id}").json()["state"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            listed = c.get("/v1/jobs", params={"state": "done"}).json()
            assert [j["job_id"] for j in listed["jobs"]] == [job_id] and not listed["next_cursor"]
            assert c.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []
            assert c.get("/v1/jobs", params={"state": "lost"}).status_code == 422
            jobs = server.app.state.runtime.jobs
            assert jobs.purge() == 0  # the default retention is a week
            assert jobs.purge(now=time.time() + 169 * HOUR) == 1
            r = c.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "job_not_found"
            assert "refrain_ingest_jobs_purged_total 1.0" in c.get("/metrics").text
            assert c.get("/v1/tracks/kept").status_code == 200  # the tracks stay
    finally:
        server.stop()


def finish_all(m: JobManager, job_id: str, states: list[ItemState]) -> None:
    for pos, state in enumerate(states):
        code = "bad_audio" if state is ItemState.FAILED else None
        m.store.finish(job_id, pos, state, None if code else "added", code, code)


def test_a_job_whose_items_all_failed_ends_failed(tmp_path):
    m = manager(tmp_path / "data")
    try:
        every, some = add_job(m, 2), add_job(m, 3)
        finish_all(m, every, [ItemState.FAILED, ItemState.FAILED])
        finish_all(m, some, [ItemState.FAILED, ItemState.DONE, ItemState.SKIPPED])
        failed, done = m.get(every), m.get(some)
        assert failed["state"] == "failed" and failed["error"] == "every item failed (see errors)"
        assert len(failed["errors"]) == 2 and failed["counts"]["failed"] == 2
        assert done["state"] == "done" and done["error"] is None
        assert done["counts"] == {"total": 3, "pending": 0, "done": 1, "failed": 1, "skipped": 1}
    finally:
        m.stop()


def test_jobs_are_listed_newest_first_by_page_and_state(tmp_path):
    m = manager(tmp_path / "data")
    try:
        ids = [add_job(m, 1) for _ in range(5)]
        for k, job_id in enumerate(ids):  # distinct creation times, oldest first
            age(tmp_path / "data", job_id, 5 - k)
        finish_all(m, ids[1], [ItemState.DONE])
        seen, cursor = [], None
        while True:
            page, cursor = m.page(limit=2, cursor=cursor)
            assert len(page) <= 2
            seen += [j["job_id"] for j in page]
            if cursor is None:
                break
        assert seen == ids[::-1]
        done, _ = m.page(state="done")
        assert [j["job_id"] for j in done] == [ids[1]] and done[0]["progress"] == 1.0
        queued, _ = m.page(state="queued")
        assert [j["job_id"] for j in queued] == [ids[4], ids[3], ids[2], ids[0]]
        assert queued[0]["progress"] == 0.0 and queued[0]["counts"]["pending"] == 1
        assert m.page(cursor="0" * 32) == ([], None)
    finally:
        m.stop()


def test_damage_met_while_running_takes_ingestion_down_until_a_restart_sets_it_aside(tmp_path):
    data = tmp_path / "data"
    m = manager(data)
    try:
        ids = [add_job(m, 5) for _ in range(40)]
        assert m.page(limit=500)[0] and m.failure is None
        m.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in jobs.sqlite
        m.store._db.execute("PRAGMA shrink_memory")  # and none in SQLite's cache
        with (data / "jobs" / "jobs.sqlite").open("r+b") as f:
            f.truncate(14_336)
        for _ in range(2):  # the damage is met once, then every call reports it
            with pytest.raises(Unavailable, match=r"jobs\.sqlite is damaged") as raised:
                m.page(limit=500)
            assert raised.value.code == "jobs_unavailable"
        assert "restart the service to set it aside" in m.failure
    finally:
        m.stop()
    m = manager(data)  # the restart: set aside with the jobs' folders, a new database
    try:
        assert m.failure is None and m.page() == ([], None) and m.get(ids[0]) is None
        (aside,) = (data / "jobs").glob("corrupt-*")
        assert (aside / "jobs.sqlite").stat().st_size == 14_336
        assert sorted(p.name for p in aside.iterdir() if p.is_dir()) == sorted(ids)
        assert add_job(m, 1) in [j["job_id"] for j in m.page()[0]]
    finally:
        m.stop()
