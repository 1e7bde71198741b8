"""Shared fixtures: a real uvicorn server on loopback running `create_app(settings)`."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

DATA = Path(__file__).parent / "data"
CKPT_A = DATA / "clews-official-A" / "checkpoint_best.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`create_app(settings)` served by uvicorn in a thread; `stop()` shuts it down cleanly."""

    def __init__(self, settings) -> None:
        from refrain.service.app import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"service failed to start: {r.json()}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("service did not become ready")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def live_server():
    """Factory: `live_server(settings)` starts a server; all are stopped after the test."""
    servers: list[LiveServer] = []

    def start(settings) -> LiveServer:
        servers.append(LiveServer(settings))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


class SmallDisk:
    """A mounted 8 MiB tmpfs that `fill(leave)` fills up to `leave` free bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self, leave: int = 0) -> None:
        self.filler.unlink(missing_ok=True)
        block = bytes(1 << 16)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    if os.write(fd, block) < len(block):
                        break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem to fill (a tmpfs; needs the right to mount, else skips)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
            check=False,
            capture_output=True,
            text=True,
        )
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs to fill: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill: {(r.stderr or r.stdout).strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
