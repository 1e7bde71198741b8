"""`refrain worker` and the API calling it, as separate processes on loopback.

The API is started with REFRAIN_WORKER_URLS naming the worker. Ingest and search go through it;
killing it in the middle of a request gives 503 with Retry-After (never 500), and the API
serves again as soon as the worker is back. A client expecting another model refuses it.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import CKPT_A, free_port
from helpers import SR, encode, synth_song

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "worker-secret"


class Process:
    """`python -m service.cli ARGS` with its output in a log file; ready once /readyz is 200."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.port = int(args[args.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "refrain.service.cli", *self.args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.args[0]} did not become ready: {self.log.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """A worker and the API using it."""
    tmp = tmp_path_factory.mktemp("remote")
    env = {"REFRAIN_WORKER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "REFRAIN_MAX_WAIT_MS": "20"}
    started: list[Process] = []
    try:
        good = Process(
            ["worker", "--port", str(free_port()), "--model", str(CKPT_A)], env, tmp / "worker.log"
        )
        started.append(good)
        api_env = {**env, "REFRAIN_WORKER_URLS": good.url}
        api = Process(
            [
                "serve",
                "--port",
                str(free_port()),
                "--data",
                str(tmp / "data"),
                "--model",
                str(CKPT_A),
                "--open-writes",
            ],
            api_env,
            tmp / "api.log",
        )
        started.append(api)
        yield good, api
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
def songs():
    return [synth_song(30.0, seed) for seed in (11, 12, 13)]


def wav(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV")
    return buf.getvalue()


def queue_depth(api: Process) -> float:
    for line in httpx.get(api.url + "/metrics").text.splitlines():
        if line.startswith("refrain_embed_queue_depth "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
def test_worker_protocol_and_identity_check(processes):
    from refrain.model import load_model
    from refrain.service.remote_worker import RemoteWorkers, WorkersUnavailable

    good, _ = processes
    ready = httpx.get(good.url + "/readyz").json()
    model = load_model(CKPT_A)
    assert ready["identity"] == model.identity.to_dict()
    wave = (0.1 * np.random.default_rng(0).standard_normal(30 * 16000)).astype("<f4")
    url = good.url + "/v1/embed"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, content=wave.tobytes()).status_code == 401
    r = httpx.post(url, params={"hop": 2.5}, content=wave.tobytes(), headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    rows, dim = map(int, r.headers["x-refrain-shape"].split(","))
    z = np.frombuffer(r.content, "<f4").reshape(rows, dim)
    np.testing.assert_allclose(z, model.embed(wave, hop=2.5), atol=1e-4)
    # transpositions: the rows of each shift in turn, each the embedding of the rolled CQT
    from refrain.model.embedder import transposed

    r = httpx.post(
        url, params={"hop": 5, "shifts": "0,-2,3"}, content=wave.tobytes(), headers=auth, timeout=60
    )
    zs = np.frombuffer(r.content, "<f4").reshape(-1, dim)
    expect = model.embed_spectrograms(
        transposed(model.spectrogram(torch.from_numpy(wave), 5.0), (0, -2, 3))
    ).numpy()
    assert zs.shape == (3 * len(model.embed(wave, hop=5.0)), dim)
    np.testing.assert_allclose(zs, expect, atol=1e-4)
    assert not np.allclose(zs[: len(zs) // 3], zs[len(zs) // 3 : 2 * len(zs) // 3], atol=1e-3)
    j = httpx.post(
        url,
        params={"hop": 2.5},
        content=wave.tobytes(),
        headers={**auth, "Accept": "application/json"},
        timeout=60,
    ).json()
    assert j["identity"] == ready["identity"] and j["shape"] == [rows, dim]
    for body, params, code in [
        (b"abc", {}, "bad_pcm"),
        (b"", {}, "bad_pcm"),
        (np.full(8, np.nan, "<f4").tobytes(), {}, "bad_pcm"),
        (wave.tobytes(), {"hop": 0}, "invalid_parameter"),
        (wave.tobytes(), {"shifts": "0,13"}, "invalid_parameter"),
        (wave.tobytes(), {"shifts": "up"}, "invalid_parameter"),
        (wave.tobytes(), {"hop": "x"}, "invalid_request"),
    ]:
        r = httpx.post(url, params=params, content=body, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["code"] == code
    metrics = httpx.get(good.url + "/metrics").text
    assert "refrain_embed_batch_segments_count" in metrics and "refrain_ready 1.0" in metrics

    # a client whose index was built by another model never uses this worker
    other = dict(ready["identity"], weights_sha256="cd" * 32)
    client = RemoteWorkers([good.url], other, token=TOKEN, health_interval_s=60)
    try:
        client.check()
        assert client.status()[0]["state"] == "mismatch"
        with pytest.raises(WorkersUnavailable, match="another model"):
            client.embed(wave, 5.0)
    finally:
        client.close()


@pytest.mark.slow
def test_ingest_search_outage_and_recovery(processes, songs):
    good, api = processes
    c = httpx.Client(base_url=api.url, timeout=120)
    for i, song in enumerate(songs):
        r = c.post(
            "/v1/tracks",
            data={"track_id": f"s{i}"},
            files={"audio": (f"s{i}.flac", encode(song, "flac"))},
        )
        assert r.status_code == 201, r.text
    clip = wav(songs[1][8 * SR : 20 * SR])
    r = c.post("/v1/search", files={"audio": ("c.wav", clip)})
    assert r.status_code == 200 and r.json()["results"][0]["track_id"] == "s1"

    # The worker stops answering mid-request (frozen, then killed): 503, never 500.
    good.signal(signal.SIGSTOP)
    answer: dict = {}
    request = threading.Thread(
        target=lambda: answer.setdefault(
            "r", c.post("/v1/search", files={"audio": ("c.wav", clip)})
        )
    )
    request.start()
    deadline = time.monotonic() + 30
    while queue_depth(api) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_depth(api) >= 1, "the search never reached the worker"
    good.signal(signal.SIGKILL)
    good.proc.wait()
    request.join(60)
    r = answer["r"]
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error"]["code"] == "workers_unavailable"

    # While no worker is up: searches and ingestion are refused with 503, reads still work.
    r = c.post(
        "/v1/tracks", data={"track_id": "s9"}, files={"audio": ("s.flac", encode(songs[0], "flac"))}
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert c.post("/v1/search", files={"audio": ("c.wav", clip)}).status_code == 503
    assert c.get("/v1/tracks/s0").status_code == 200
    assert c.get("/readyz").status_code == 200

    # The worker comes back on the same address: the API serves again.
    good.start()
    r = c.post("/v1/search", files={"audio": ("c.wav", clip)})
    assert r.status_code == 200 and r.json()["results"][0]["track_id"] == "s1"
    r = c.post(
        "/v1/tracks", data={"track_id": "s9"}, files={"audio": ("s.flac", encode(songs[2], "flac"))}
    )
    assert r.status_code == 201, r.text
    metrics = c.get("/metrics").text
    assert 'refrain_errors_total{type="workers_unavailable"}' in metrics
    assert 'status="500"' not in metrics
    c.close()


def test_no_reachable_worker_is_a_503_with_retry_after():
    from refrain.service.http_errors import classify
    from refrain.service.remote_worker import RemoteWorkers, WorkersUnavailable
    from refrain.service.worker import Overloaded

    identity = {"weights_sha256": "ab" * 32, "zdim": 4}
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    workers = RemoteWorkers([dead], identity, health_interval_s=60)
    try:
        with pytest.raises(WorkersUnavailable, match="unreachable") as err:
            workers.embed(np.zeros(16000, np.float32), 5.0)
        api = classify(err.value)
        assert api.status == 503 and api.code == "workers_unavailable"
        assert api.headers == {"Retry-After": "5"}
        assert workers.status()[0]["state"] == "down" and workers.depth == 0
        assert isinstance(err.value, Overloaded)  # bulk ingestion retries it later
    finally:
        workers.close()
    with pytest.raises(ValueError, match="at least one worker"):
        RemoteWorkers([], identity)
