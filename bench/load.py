"""HTTP load benchmark of POST /v1/search: concurrent clients, throughput, latency, status codes.

    python bench/load.py --spawn                          # own server, 1 2 4 16 64 clients
    python bench/load.py --url http://127.0.0.1:8000 --clip query.wav --concurrency 8

Each concurrency level sends `--requests` searches of the same clip from that many client
threads (one httpx connection each) and prints one row: throughput of answered searches,
p50/p99 latency of the 200s as the client sees it (upload, decode, embedding, search), the
server's median embedding time, and the count of each status code. Below saturation every
request is answered 200; above it the service's bounded embedding queue (REFRAIN_MAX_QUEUE)
answers 503 with Retry-After at once; any other status (a 500 above all) is a failure and
makes the script exit with status 1.

--spawn starts `refrain serve` on a free loopback port with a temporary data folder and a
small queue (--max-queue), adds a few synthetic reference songs through POST /v1/tracks, and
queries a 30 s excerpt of one of them; without --clip the same excerpt is used against --url.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SR, encode, synth_song  # tests/helpers.py: seeded songs

CLIP_S = 30.0


@dataclass
class Level:
    """What one concurrency level observed."""

    clients: int
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, 200 responses
    embed_ms: list[float] = field(default_factory=list)  # server-side, 200 responses
    statuses: Counter = field(default_factory=Counter)
    missing_retry_after: int = 0  # 503s without the header

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failures(self) -> int:
        """Responses that are neither 200 nor a 503 with Retry-After, and transport errors."""
        return sum(n for s, n in self.statuses.items() if s not in (200, 503)) + (
            self.missing_retry_after
        )


def run_level(url: str, clip: bytes, clients: int, requests: int, timeout: float) -> Level:
    level = Level(clients)
    lock = threading.Lock()
    local = threading.local()
    pending = iter(range(requests))

    def one(_: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=timeout)
        t0 = time.perf_counter()
        try:
            r = client.post("/v1/search", files={"audio": ("clip.wav", clip, "audio/wav")})
            status: int | str = r.status_code
        except httpx.HTTPError as e:
            r, status = None, type(e).__name__
        elapsed = time.perf_counter() - t0
        with lock:
            level.statuses[status] += 1
            if status == 200:
                level.latencies.append(elapsed)
                level.embed_ms.append(r.json()["timings_ms"].get("embed", float("nan")))
            elif status == 503 and "retry-after" not in r.headers:
                level.missing_retry_after += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, pending))
    level.wall_s = time.perf_counter() - t0
    return level


# -- a server of our own --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`refrain serve` in a subprocess on loopback, with its own data folder."""

    def __init__(self, data: Path, max_queue: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "REFRAIN_MAX_QUEUE": str(max_queue), "REFRAIN_API_KEYS": ""}
        self.log = open(log, "wb")  # noqa: SIM115 - open for the process's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refrain.service.cli",
                "serve",
                "--port",
                str(self.port),
                "--data",
                str(data),
                "--device",
                "cpu",
                "--open-writes",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"refrain serve exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"refrain serve was not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def reference_songs(n: int, seconds: float) -> list[np.ndarray]:
    return [synth_song(seconds, seed=100 + i) for i in range(n)]


def add_references(url: str, songs: list[np.ndarray]) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        for i, song in enumerate(songs):
            r = client.post(
                "/v1/tracks",
                data={"track_id": f"ref-{i}", "title": f"Song {i}"},
                files={"audio": (f"ref-{i}.wav", encode(song, "wav"), "audio/wav")},
            )
            if r.status_code not in (200, 201):
                raise SystemExit(f"adding reference {i} failed: {r.status_code} {r.text}")


def excerpt(song: np.ndarray) -> bytes:
    """A 30 s WAV clip cut from the middle of a reference song (44.1 kHz stereo)."""
    start = max(0, (len(song) - int(CLIP_S * SR)) // 2)
    return encode(song[start : start + int(CLIP_S * SR)], "wav")


# -- driver ---------------------------------------------------------------------------------


def pct(values: list[float], q: float, scale: float = 1.0) -> str:
    return f"{np.percentile(values, q) * scale:.0f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="start `refrain serve` with a temporary data folder instead",
    )
    parser.add_argument(
        "--clip",
        type=Path,
        default=None,
        help="query audio file (default: a 30 s synthetic excerpt)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="searches per level")
    parser.add_argument(
        "--max-queue", type=int, default=4, help="REFRAIN_MAX_QUEUE of the spawned server"
    )
    parser.add_argument(
        "--references",
        type=int,
        default=4,
        help="synthetic reference songs added to the spawned server",
    )
    parser.add_argument("--reference-seconds", type=float, default=90.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = parser.parse_args(argv)

    songs = reference_songs(args.references if args.spawn else 1, args.reference_seconds)
    clip = args.clip.read_bytes() if args.clip else excerpt(songs[0])
    server = None
    with tempfile.TemporaryDirectory(prefix="refrain-load-") as tmp:
        try:
            if args.spawn:
                server = Server(Path(tmp) / "data", args.max_queue, Path(tmp) / "serve.log")
                server.wait_ready()
                t0 = time.perf_counter()
                add_references(server.url, songs)
                print(
                    f"# spawned refrain serve at {server.url} (REFRAIN_MAX_QUEUE="
                    f"{args.max_queue}); {len(songs)} references of "
                    f"{args.reference_seconds:.0f} s added in {time.perf_counter() - t0:.1f} s"
                )
            url = server.url if server else args.url
            print(
                f"# {os.cpu_count()} CPUs, load average "
                f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; clip "
                f"{len(clip) / 1e6:.1f} MB; {args.requests} searches per level"
            )
            run_level(url, clip, 1, 2, args.timeout)  # warm up
            levels = []
            print(
                "\n| clients | requests | wall s | req/s (200) | p50 ms | p99 ms "
                "| embed ms (server p50) | 200 | 503 | other |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for c in args.concurrency:
                lv = run_level(url, clip, c, args.requests, args.timeout)
                levels.append(lv)
                other = {s: n for s, n in lv.statuses.items() if s not in (200, 503)}
                print(
                    f"| {c} | {args.requests} | {lv.wall_s:.1f} | {lv.ok / lv.wall_s:.2f} "
                    f"| {pct(lv.latencies, 50, 1e3)} | {pct(lv.latencies, 99, 1e3)} "
                    f"| {pct(lv.embed_ms, 50)} | {lv.ok} | {lv.statuses.get(503, 0)} "
                    f"| {sum(other.values())}{' ' + str(other) if other else ''} |",
                    flush=True,
                )
        finally:
            if server is not None:
                server.stop()
    bad = sum(lv.failures for lv in levels)
    if bad:
        print(f"\nFAIL: {bad} responses were neither 200 nor 503 with Retry-After")
        return 1
    print("\nevery response was 200 or 503 with Retry-After")
    return 0


if __name__ == "__main__":
    sys.exit(main())
