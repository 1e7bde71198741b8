"""Embedding through `refrain worker` processes: the API's client for one or more workers.

`RemoteWorkers` has the interface of the in-process `InferenceWorker` (`embed`, `embed_async`,
`depth`, `close`), so the runtime uses either. Each request goes to the least busy worker
that is up; a worker that cannot be reached, times out, or answers 5xx is skipped and the
request is retried on the next one, then on workers last seen down (one may be back before its
next health check). A worker serving another model than the index's is never used. When no
worker can embed the request the caller gets `WorkersUnavailable`, a 503 with Retry-After.

A background thread polls every worker's `/readyz`, which reports its model identity.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from refrain.service.metrics import Metrics
from refrain.service.worker import Overloaded

log = logging.getLogger("refrain.remote_worker")

CONNECT_TIMEOUT_S = 2.0  # a worker that does not accept a connection this fast is down
HEALTH_TIMEOUT_S = 5.0


class WorkersUnavailable(Overloaded):
    """No inference worker could embed the request (down, unreachable, busy or another model)."""


class WorkerRejected(RuntimeError):
    """A worker refused the request itself (4xx): retrying elsewhere would not help."""


class _Retry(Exception):
    """This worker failed; try another."""


@dataclass
class _Worker:
    url: str
    state: str = "unknown"  # up | loading | down | mismatch | unknown
    detail: str = ""
    in_flight: int = 0


class RemoteWorkers:
    """Embeds waveforms on remote workers; see the module docstring."""

    def __init__(
        self,
        urls: Sequence[str],
        identity: dict[str, Any],
        metrics: Metrics | None = None,
        *,
        timeout_s: float = 120.0,
        max_in_flight: int = 64,
        health_interval_s: float = 5.0,
        token: str = "",
    ) -> None:
        if not urls:
            raise ValueError("expected at least one worker URL, got none")
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.health_interval_s = health_interval_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # one INFO line per request (and per health check) would drown the service's log
        logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").level, logging.WARNING))
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        self._workers = [_Worker(u.rstrip("/")) for u in urls]
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._health_loop, name="refrain-worker-health", daemon=True
        )
        self._thread.start()

    # -- the InferenceWorker interface ---------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests in flight to the workers."""
        with self._lock:
            return sum(w.in_flight for w in self._workers)

    def embed(
        self,
        wave: np.ndarray,
        hop_s: float,
        timeout: float | None = None,
        shifts: Sequence[int] = (0,),
    ) -> np.ndarray:
        """A 1-D waveform at the model's rate -> (len(shifts) * S, zdim) float32, from the first
        worker able (see `InferenceWorker.submit`)."""
        if self.depth >= self.max_in_flight:
            raise Overloaded(f"{self.max_in_flight} embedding requests are already in flight")
        body = np.ascontiguousarray(wave, dtype="<f4").tobytes()
        tried: set[str] = set()
        failures: list[str] = []
        busy = 0
        while (worker := self._pick(tried)) is not None:
            tried.add(worker.url)
            try:
                return self._post(worker, body, hop_s, timeout, shifts)
            except _Retry as e:
                failures.append(f"{worker.url}: {e}")
                busy += "overloaded" in str(e)
        if failures and busy == len(failures):
            raise Overloaded("every inference worker is busy: " + "; ".join(failures))
        with self._lock:
            skipped = [f"{w.url}: {w.detail}" for w in self._workers if w.state == "mismatch"]
        raise WorkersUnavailable(
            "no inference worker could embed the audio ("
            + "; ".join(failures + skipped or ["none is configured"])
            + ")"
        )

    async def embed_async(
        self, wave: np.ndarray, hop_s: float, shifts: Sequence[int] = (0,)
    ) -> np.ndarray:
        return await asyncio.to_thread(self.embed, wave, hop_s, None, shifts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEALTH_TIMEOUT_S + CONNECT_TIMEOUT_S)
        self._client.close()

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"url": w.url, "state": w.state, "detail": w.detail, "in_flight": w.in_flight}
                for w in self._workers
            ]

    # -- choosing and calling a worker ---------------------------------------------------------

    def _pick(self, tried: set[str]) -> _Worker | None:
        """The least busy worker that is up, else one in another state worth a try."""
        rank = {"up": 0, "unknown": 1, "loading": 2, "down": 3}
        with self._lock:
            turn = next(self._turn)
            n = len(self._workers)
            rotated = [self._workers[(turn + i) % n] for i in range(n)]
            options = [w for w in rotated if w.url not in tried and w.state in rank]
            if not options:
                return None
            worker = min(options, key=lambda w: (rank[w.state], w.in_flight))
            worker.in_flight += 1
        self._gauge()
        return worker

    def _post(
        self,
        worker: _Worker,
        body: bytes,
        hop_s: float,
        timeout: float | None,
        shifts: Sequence[int] = (0,),
    ) -> np.ndarray:
        params = {"hop": repr(float(hop_s))}
        if tuple(shifts) != (0,):
            params["shifts"] = ",".join(str(int(s)) for s in shifts)
        try:
            r = self._client.post(
                worker.url + "/v1/embed",
                params=params,
                content=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Accept": "application/octet-stream",
                },
                timeout=httpx.Timeout(timeout or self.timeout_s, connect=CONNECT_TIMEOUT_S),
            )
        except httpx.TimeoutException as e:
            self._mark(worker, "down", f"timed out ({type(e).__name__})")
            raise _Retry(f"timed out ({type(e).__name__})") from e
        except httpx.TransportError as e:
            self._mark(worker, "down", f"unreachable ({type(e).__name__}: {e})")
            raise _Retry(f"unreachable ({type(e).__name__})") from e
        finally:
            with self._lock:
                worker.in_flight -= 1
            self._gauge()
        if r.status_code == 503:
            code = _error_code(r)
            if code == "not_ready":
                self._mark(worker, "loading", "not ready")
            raise _Retry(code or "503")
        if r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code} {_error_code(r) or ''}".strip())
        if r.status_code != 200:
            raise WorkerRejected(
                f"worker {worker.url} refused the audio: HTTP {r.status_code} {r.text[:300]}"
            )
        model = r.headers.get("x-refrain-model", "")
        if model != self.identity.get("weights_sha256"):
            self._mark(
                worker,
                "mismatch",
                f"serves model {model[:12]!r}, the index needs "
                f"{str(self.identity.get('weights_sha256'))[:12]!r}",
            )
            raise _Retry("serves another model")
        z = _decode(r, int(self.identity["zdim"]))
        self._mark(worker, "up", "")
        return z

    def _mark(self, worker: _Worker, state: str, detail: str) -> None:
        with self._lock:
            changed = worker.state != state
            worker.state, worker.detail = state, detail
        if changed:
            level = logging.INFO if state == "up" else logging.WARNING
            if state == "mismatch":
                level = logging.ERROR
            log.log(
                level,
                "inference worker %s: %s%s",
                worker.url,
                state,
                f" ({detail})" if detail else "",
            )

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.depth)

    # -- health --------------------------------------------------------------------------------

    def check(self) -> None:
        """Poll every worker's /readyz once and record what it says."""
        for worker in self._workers:
            try:
                r = self._client.get(
                    worker.url + "/readyz",
                    timeout=httpx.Timeout(HEALTH_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                )
            except httpx.HTTPError as e:
                self._mark(worker, "down", f"unreachable ({type(e).__name__})")
                continue
            if r.status_code != 200:
                self._mark(worker, "loading", f"/readyz answered {r.status_code}")
                continue
            try:
                theirs = r.json()["identity"]
            except (ValueError, KeyError, TypeError):
                self._mark(worker, "mismatch", "/readyz reports no model identity")
                continue
            diff = [
                f"{k}: index has {self.identity.get(k)!r}, worker has {theirs.get(k)!r}"
                for k in sorted(set(self.identity) | set(theirs))
                if self.identity.get(k) != theirs.get(k)
            ]
            if diff:
                self._mark(worker, "mismatch", "another model (" + "; ".join(diff) + ")")
            else:
                self._mark(worker, "up", "")

    def _health_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # never let the checker die
                log.exception("worker health check failed")
            self._stop.wait(self.health_interval_s)


def _error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _decode(r: httpx.Response, zdim: int) -> np.ndarray:
    """The octet-stream answer of /v1/embed -> (S, zdim) float32."""
    try:
        rows, dim = (int(x) for x in r.headers.get("x-refrain-shape", "").split(","))
    except ValueError:
        raise _Retry("answer without a valid X-Refrain-Shape header") from None
    if dim != zdim or len(r.content) != rows * dim * 4:
        raise _Retry(
            f"answer of shape ({rows}, {dim}) and {len(r.content)} bytes, expected zdim {zdim}"
        )
    return np.frombuffer(r.content, dtype="<f4").reshape(rows, dim).astype(np.float32)
