"""Shared fixtures: a real uvicorn server on loopback running `create_app(settings)`."""

from __future__ import annotations

import socket
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
        from service.app import create_app

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


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
