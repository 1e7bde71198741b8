"""The CPU container image, built and run for real: a Docker engine started by the test with no
bridge network, a Debian base made with debootstrap from the host's apt mirror, Python packages
from a wheelhouse (the build itself runs with `--network none`), then the image started with
`--network host`, its HEALTHCHECK awaited, two files ingested and a clip searched on loopback.

Skips, with the reason, where no engine can start (not root, no dockerd or debootstrap)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import encode, synth_song

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "data" / "audio"
KEY = "image-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = "refrain:test-cpu"
BASE = "refrain-base:test-bookworm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory):
    """A private Docker engine: no bridge, no iptables, its own socket and data root."""
    missing = [b for b in ("dockerd", "docker", "debootstrap") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install docker.io debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("dockerd and debootstrap need root")
    home = tmp_path_factory.mktemp("docker")
    sock = home / "docker.sock"
    log = (home / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            f"--data-root={home / 'root'}",
            f"--exec-root={home / 'exec'}",
            f"--pidfile={home / 'dockerd.pid'}",
            f"--host=unix://{sock}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    deadline = time.monotonic() + 60
    while True:
        probe = subprocess.run(["docker", "version"], env=env, capture_output=True, check=False)
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (home / "dockerd.log").read_text(errors="replace")[-800:]
            pytest.skip(f"dockerd did not start: {tail}")
        time.sleep(0.5)
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    # what the engine left mounted under its folders (network namespaces, overlays) goes first
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(home))), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(home, ignore_errors=True)


def docker(env, *args: str, timeout: float = 120) -> str:
    r = subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    return r.stdout.strip()


def wait_healthy(env, name: str, timeout: float = 300) -> float:
    """Seconds until Docker's own HEALTHCHECK says healthy."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        state = json.loads(docker(env, "inspect", "--format", "{{json .State}}", name))
        if state["Status"] != "running":
            raise AssertionError(f"container stopped: {docker(env, 'logs', name)[-3000:]}")
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - start
        time.sleep(2)
    raise AssertionError(f"not healthy after {timeout} s: {docker(env, 'logs', name)[-3000:]}")


def test_cpu_image_builds_offline_runs_healthy_and_answers_a_search(docker_env, tmp_path):
    env = {**docker_env, "REFRAIN_IMAGE": IMAGE, "REFRAIN_BASE_IMAGE": BASE}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "offline-build.sh"), "all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    build_s = time.monotonic() - t0
    # the build ran with --network none: every package came from the wheelhouse
    assert "Looking in links: /wheels" in build.stdout
    assert "Successfully tagged " + IMAGE in build.stdout
    size = int(docker(env, "image", "inspect", "--format", "{{.Size}}", IMAGE))
    user = docker(env, "image", "inspect", "--format", "{{.Config.User}}", IMAGE)
    assert user == "10001:10001"

    port = free_port()
    name = f"refrain-test-{port}"
    docker(
        env,
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--env",
        f"REFRAIN_API_KEYS={KEY}",
        "--env",
        f"REFRAIN_HEALTH_URL=http://127.0.0.1:{port}/healthz",
        IMAGE,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    try:
        healthy_s = wait_healthy(env, name)
        assert docker(env, "exec", name, "id", "-u") == "10001"
        other = tmp_path / "other.mp3"
        other.write_bytes(encode(synth_song(40.0, seed=5), "mp3"))
        files = [
            ("files", (p.name, p.read_bytes(), "application/octet-stream"))
            for p in (AUDIO / "song75s.flac", other)
        ]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/v1/tracks").status_code == 401  # keys set: reads need one too
            r = c.post("/v1/ingest", files=files, headers=AUTH)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 300
            while (job := c.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["state"] not in (
                "done",
                "failed",
            ):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["state"] == "done" and job["counts"]["done"] == 2, job
            clip = (AUDIO / "song75s_first12s.flac").read_bytes()
            r = c.post("/v1/search", files={"audio": ("clip.flac", clip)}, headers=AUTH)
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert hits[0]["track_id"] == "song75s", hits
            match = hits[0]["matches"][0]
            assert match["ref_start_s"] < 3.0, match  # the clip is the song's first 12 s
    finally:
        logs = subprocess.run(
            ["docker", "logs", name], env=env, capture_output=True, text=True, check=False
        )
        with contextlib.suppress(AssertionError):
            docker(env, "stop", "--time", "20", name)
        stopped = json.loads(docker(env, "inspect", "--format", "{{json .State}}", name))
        docker(env, "rm", "--volumes", name)
    assert stopped["Status"] == "exited", stopped
    assert "Traceback" not in logs.stdout + logs.stderr
    print(
        f"\nimage {IMAGE}: {size / 1e6:.0f} MB, built in {build_s:.0f} s (base, wheels, image), "
        f"healthy {healthy_s:.0f} s after start"
    )
