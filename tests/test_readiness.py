"""What /readyz reports, against a live server: a catalog left behind by a full disk clears by
itself once space is back; a job database that cannot be read is set aside and replaced, one
that cannot be opened makes the service degraded, a deleted one is reported in the log; the
snapshot interval settings reach the index."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from test_ingest import clip, upload, wait_job

from refrain.service.settings import Settings

from conftest import CKPT_A, LiveServer

KEY = {"Authorization": "Bearer k1"}


def settings(data: Path, **kw) -> Settings:
    base = {"data_dir": data, "model": str(CKPT_A), "api_keys": "k1", "min_free_bytes": 0}
    return Settings(**{**base, **kw})


class LoadedServer(LiveServer):
    """A live server that counts as started once loaded, ready or degraded."""

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).json()["status"] != "loading":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("service did not load")


def add(client, tmp_path: Path, track_id: str) -> None:
    audio = clip(tmp_path / f"{track_id}.wav").read_bytes()
    r = client.post("/v1/tracks", files={"audio": ("a.wav", audio)}, data={"track_id": track_id})
    assert r.status_code == 201, r.text


def ready_within(client, seconds: float) -> dict:
    """Poll /readyz alone (no other request) until it answers 200, or give up."""
    deadline = time.monotonic() + seconds
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 or time.monotonic() > deadline:
            return {"code": r.status_code, **r.json()}
        time.sleep(0.2)


# -- the catalog behind the journal after a full disk ----------------------------------------


def test_readiness_recovers_by_itself_once_a_full_disk_has_room(small_disk, tmp_path):
    server = LiveServer(settings(small_disk.path / "data"))
    try:
        with server.client(headers=KEY) as c:
            for n in range(5):
                add(c, tmp_path, f"t{n}")
            # one free page: room for the journal's delete record, not for the catalog's WAL
            small_disk.fill(leave=4096)
            r = c.delete("/v1/tracks/t0")
            assert r.status_code == 200, r.text  # durable in the journal
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "degraded"
            assert "catalog.sqlite is behind the journal" in ready.json()["error"]
            assert c.get("/v1/tracks/t0").status_code == 503  # never a stale answer

            small_disk.free()
            assert ready_within(c, 15) == {"code": 200, "status": "ready"}
            assert c.get("/v1/tracks/t0").status_code == 404
            assert [t["track_id"] for t in c.get("/v1/tracks").json()["tracks"]] == [
                "t1",
                "t2",
                "t3",
                "t4",
            ]
    finally:
        server.stop()


# -- the job database ---------------------------------------------------------------------------


def jobs_with_history(data: Path, tmp_path: Path) -> str:
    """A service run that leaves a finished job; returns its id."""
    server = LiveServer(settings(data))
    try:
        with server.client(headers=KEY) as c:
            r = c.post("/v1/ingest", files=upload([clip(tmp_path / f"h{n}.wav") for n in range(3)]))
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            assert wait_job(c, job_id)["state"] == "done"
    finally:
        server.stop()
    return job_id


def ingest_works(client, tmp_path: Path) -> None:
    r = client.post("/v1/ingest", files=upload([clip(tmp_path / "new.wav")]))
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job_id"])["counts"]["done"] == 1


def test_a_job_database_cut_short_is_set_aside_and_ingestion_works(tmp_path, caplog):
    data = tmp_path / "data"
    old_job = jobs_with_history(data, tmp_path)
    db = data / "jobs" / "jobs.sqlite"
    with sqlite3.connect(db) as conn:  # enough history to span more than 14 kB of pages
        conn.executemany(
            "INSERT INTO jobs (id, state, source, total, created) "
            "VALUES (?, 'done', 'files', 0, ?)",
            [(f"{n:032x}", time.time()) for n in range(400)],
        )
    assert db.stat().st_size > 14_336
    with db.open("r+b") as f:
        f.truncate(14_336)
    (data / "jobs" / ("a" * 32) / "files").mkdir(parents=True)  # an unfinished job's folder

    caplog.set_level(logging.WARNING, logger="refrain.jobs")
    server = LiveServer(settings(data))
    try:
        with server.client(headers=KEY) as c:
            assert c.get("/readyz").json() == {"status": "ready"}
            assert c.get("/v1/jobs").json()["jobs"] == []
            assert c.get(f"/v1/jobs/{old_job}").status_code == 404
            ingest_works(c, tmp_path)
    finally:
        server.stop()
    (aside,) = (data / "jobs").glob("corrupt-*")
    assert (aside / "jobs.sqlite").stat().st_size == 14_336  # kept as it was
    assert (aside / ("a" * 32) / "files").is_dir()  # with the folders of its jobs
    assert not (data / "jobs" / ("a" * 32)).exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(aside / "jobs.sqlite") in w for w in warnings), warnings


def test_a_job_database_that_cannot_be_opened_makes_the_service_degraded(tmp_path):
    data = tmp_path / "data"
    (data / "jobs" / "jobs.sqlite").mkdir(parents=True)  # not a file: SQLite cannot open it
    server = LoadedServer(settings(data))  # starts: search and the catalog serve
    try:
        with server.client(headers=KEY) as c:
            add(c, tmp_path, "a")
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
            body = ready.json()
            assert body["status"] == "degraded"
            assert body["error"].startswith("ingestion: the job database ")
            assert str(data / "jobs" / "jobs.sqlite") in body["error"]
            r = c.get("/v1/jobs")
            assert r.status_code == 503 and r.json()["error"]["code"] == "jobs_unavailable"
            assert c.get("/v1/tracks/a").status_code == 200
    finally:
        server.stop()
    assert (data / "jobs" / "jobs.sqlite").is_dir()  # left for the operator


def test_a_deleted_job_database_is_reported_at_start_up(tmp_path, caplog):
    data = tmp_path / "data"
    old_job = jobs_with_history(data, tmp_path)
    (data / "jobs" / "jobs.sqlite").unlink()
    caplog.set_level(logging.WARNING, logger="refrain.jobs")
    server = LiveServer(settings(data))
    try:
        with server.client(headers=KEY) as c:
            assert c.get("/readyz").json() == {"status": "ready"}
            assert c.get(f"/v1/jobs/{old_job}").status_code == 404
            ingest_works(c, tmp_path)
    finally:
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("jobs.sqlite is missing" in w and "history is lost" in w for w in warnings)


# -- the snapshot interval ------------------------------------------------------------------------


def test_the_snapshot_interval_settings_reach_the_index(tmp_path):
    server = LiveServer(settings(tmp_path / "data", snapshot_every_records=3))
    try:
        with server.client(headers=KEY) as c:
            for n in range(2):
                add(c, tmp_path, f"t{n}")
            index = c.get("/v1/stats").json()["index"]
            assert (index["snapshot_seq"], index["journal_records"]) == (0, 2)
            add(c, tmp_path, "t2")  # the third record: a snapshot, the journal emptied
            index = c.get("/v1/stats").json()["index"]
            assert (index["snapshot_seq"], index["journal_records"]) == (3, 0)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("snapshot_every_records", 0),
        ("snapshot_every_records", 10**9),
        ("snapshot_every_bytes", 4096),
        ("snapshot_every_bytes", 1 << 50),
    ],
)
def test_absurd_snapshot_intervals_are_refused_at_start_up(name, value, monkeypatch):
    monkeypatch.setenv(f"REFRAIN_{name.upper()}", str(value))
    with pytest.raises(ValueError, match=f"{name} must be between"):
        Settings()


def test_the_snapshot_interval_defaults_are_the_index_defaults(monkeypatch):
    from refrain.index import IndexOptions

    s, o = Settings(), IndexOptions()
    assert (s.snapshot_every_records, s.snapshot_every_bytes) == (
        o.snapshot_every_records,
        o.snapshot_every_bytes,
    )
    monkeypatch.setenv("REFRAIN_SNAPSHOT_EVERY_BYTES", str(64 << 20))
    assert Settings().snapshot_every_bytes == 64 << 20
