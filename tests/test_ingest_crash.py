"""A bulk job survives `kill -9` of the service: items reported done stay stored, the rest
is finished after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_ingest import KEY, clip, upload

from conftest import CKPT_A, free_port

ROOT = Path(__file__).resolve().parent.parent
N_FILES = 20


class Service:
    """`uvicorn --factory service.app:create_app` in a subprocess, configured by env."""

    def __init__(self, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "REFRAIN_DATA_DIR": str(data),
            "REFRAIN_MODEL": str(CKPT_A),
            "REFRAIN_API_KEYS": "k1",
            "REFRAIN_OPEN_WRITES": "false",
        }
        self.log = open(log, "ab")  # noqa: SIM115 - open for the process's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "refrain.service.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the service exited during start-up"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("service did not become ready")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=KEY, timeout=60)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.mark.slow
def test_kill_9_mid_job_keeps_done_items_and_finishes_the_rest(tmp_path):
    data = tmp_path / "data"
    paths = [clip(tmp_path / "in" / f"crash{i:02d}.wav", seconds=8) for i in range(N_FILES)]
    first = Service(data, tmp_path / "service.log")
    try:
        with first.client() as c:
            r = c.post("/v1/ingest", files=upload(paths))
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 120
            while True:
                job = c.get(f"/v1/jobs/{job_id}", params={"items": "true"}).json()
                done = [i["track_id"] for i in job["items"] if i["state"] == "done"]
                if len(done) >= 3:
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
    finally:
        first.kill()
    assert job["counts"]["pending"] > 0, "the job finished before the kill; use more files"

    second = Service(data, tmp_path / "service.log")
    try:
        with second.client() as c:
            for track_id in done:
                r = c.get(f"/v1/tracks/{track_id}")
                assert r.status_code == 200, (track_id, r.text)
            deadline = time.monotonic() + 180
            while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
            assert job["state"] == "done"
            counts = job["counts"]
            assert counts["failed"] == 0 and counts["done"] + counts["skipped"] == N_FILES
            for p in paths:
                assert c.get(f"/v1/tracks/{p.stem}").status_code == 200
            assert c.get("/v1/stats").json()["index"]["tracks"] == N_FILES
        assert not [d for d in (data / "jobs").iterdir() if d.is_dir()]
    finally:
        second.stop()
