"""The in-process inference worker: one bounded queue in front of the model, dynamic batching.

Requests carry decoded waveforms. The worker thread takes one, then keeps taking more
for up to `max_wait_s` or until `max_batch` segments are pending, runs the network once
over all their segments, and hands each request its rows. A full queue refuses new work
(`Overloaded`, answered 503 with Retry-After) instead of letting latency grow unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from refrain.model.embedder import Embedder, transposed
from refrain.service.metrics import Metrics

log = logging.getLogger("refrain.worker")


class Overloaded(RuntimeError):
    """The embedding queue is full."""


@dataclass
class _Job:
    wave: torch.Tensor
    hop_s: float
    shifts: tuple[int, ...] = (0,)
    future: Future = field(default_factory=Future)


_STOP = object()


class InferenceWorker:
    def __init__(
        self,
        model: Embedder,
        metrics: Metrics | None = None,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="refrain-inference", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, wave: np.ndarray, hop_s: float, shifts: Sequence[int] = (0,)) -> Future:
        """Queue a 1-D waveform at the model's rate; the future gives (len(shifts) * S, zdim)
        float32: the S segments embedded at each CQT shift in turn (see `transposed`)."""
        job = _Job(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
            hop_s,
            tuple(int(s) for s in shifts),
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"embedding queue is full ({self._queue.maxsize} requests)") from None
        self._gauge()
        return job.future

    def embed(
        self,
        wave: np.ndarray,
        hop_s: float,
        timeout: float | None = None,
        shifts: Sequence[int] = (0,),
    ) -> np.ndarray:
        return self.submit(wave, hop_s, shifts).result(timeout)

    async def embed_async(
        self, wave: np.ndarray, hop_s: float, shifts: Sequence[int] = (0,)
    ) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(wave, hop_s, shifts))

    def close(self) -> None:
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    return
        self._thread.join(timeout=30)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())

    def _take(self) -> list[tuple[_Job, torch.Tensor]] | None:
        """Block for one job, then gather more until the batch is full or the wait is over."""
        first = self._queue.get()
        if first is _STOP:
            return None
        jobs: list[tuple[_Job, torch.Tensor]] = []
        pending = 0
        deadline = time.monotonic() + self.max_wait_s
        job = first
        while True:
            if job is _STOP:
                self._queue.put(_STOP)  # stop after this batch
                break
            if job.future.set_running_or_notify_cancel():
                try:
                    cqt = transposed(self.model.spectrogram(job.wave, job.hop_s), job.shifts)
                    jobs.append((job, cqt))
                    pending += len(cqt)
                except Exception as e:  # noqa: BLE001 - a bad request must not stop the worker
                    job.future.set_exception(e)
            remaining = deadline - time.monotonic()
            if pending >= self.max_batch or remaining <= 0:
                break
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
        self._gauge()
        return jobs

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if not jobs:
                continue
            try:
                t0 = time.perf_counter()
                cqt = torch.cat([c for _, c in jobs])
                z = self.model.embed_spectrograms(cqt, self.max_batch).cpu().numpy()
                if self.metrics:
                    self.metrics.batch_latency.observe(time.perf_counter() - t0)
                    self.metrics.batch_size.observe(len(cqt))
                pos = 0
                for job, c in jobs:
                    job.future.set_result(z[pos : pos + len(c)].copy())
                    pos += len(c)
                    if self.metrics:
                        self.metrics.audio_embedded.inc(len(job.wave) / self.model.sample_rate)
            except Exception as e:
                log.exception("embedding batch failed")
                for job, _ in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
