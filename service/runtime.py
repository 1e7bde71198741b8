"""Start-up and shut-down of a running service: the model, the store, the inference worker,
the ingestion jobs, and the `Engine` that the routes call once all of them are up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from refrain.index import AddResult, SegmentStore
from refrain.model.calibration import Calibration, uncalibrated_score
from refrain.model.embedder import Embedder, load_model
from refrain.service.backend import open_store
from refrain.service.engine import Engine, SegmentEmbedder
from refrain.service.errors import Unavailable, not_ready
from refrain.service.jobs import JobManager
from refrain.service.metrics import Metrics
from refrain.service.remote_worker import RemoteWorkers
from refrain.service.settings import Settings
from refrain.service.sources import Item
from refrain.service.worker import InferenceWorker

log = logging.getLogger("refrain.service")


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.jobs = JobManager(settings, metrics, self.ingest_item, lambda: self.ready)
        self.load_error: str | None = None
        self.jobs_error: str | None = None  # why ingestion is down while search is up
        self._model: Embedder | None = None
        self._store: SegmentStore | None = None
        self._worker: SegmentEmbedder | None = None
        self._ready = threading.Event()

    def load(self) -> None:
        """Load the model, open the store, start the worker and resume jobs (blocking)."""
        s = self.settings
        try:
            # with remote workers the model here only decodes and describes: no GPU needed
            gpu = torch.cuda.is_available() and not s.worker_list
            self._model = model = load_model(s.model, device=s.device or ("cuda" if gpu else "cpu"))
            calibration = model.info.get("calibration")
            cal = Calibration.from_dict(calibration) if calibration else None
            score = _scorer(cal) if cal else None
            fused = cal.fused_probability if cal and cal.fused else None
            s.data_dir.mkdir(parents=True, exist_ok=True)
            self._store = store = open_store(s, self._identity(model))
            self._worker = self._start_worker(model, store)
            self.engine = Engine(
                s, model, store, self._worker, self.metrics, score or uncalibrated_score, fused
            )
            self._start_jobs()
            self.engine.refresh_metrics()
            self._ready.set()
            self.metrics.ready.set(1)
            log.info("ready: model %s, %d tracks", model.identity.weights_sha256[:12], len(store))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("failed to start: %s", self.load_error)
            raise

    def _start_jobs(self) -> None:
        """Resume ingestion; a job database that cannot be opened (a damaged one is set aside
        and replaced first) takes ingestion down (503 naming the file, /readyz degraded), not
        search and the catalog."""
        try:
            self.jobs.start()
        except Exception as e:  # noqa: BLE001 - reported by every ingestion request
            where = self.jobs.database
            self.jobs_error = f"the job database {where} cannot be opened ({e}); move it away "
            self.jobs_error += "to start with no jobs, or restore it from a backup"
            log.error("ingestion is down: %s", self.jobs_error)

    def jobs_failure(self) -> str | None:
        """Why ingestion cannot serve (None: it can): its database could not be opened at
        start-up, or met damage since."""
        return self.jobs_error or self.jobs.failure

    def jobs_ready(self) -> JobManager:
        """The job manager, once the engine is up and the job database open."""
        self.core()
        failure = self.jobs_failure()
        if failure is not None:
            raise Unavailable("jobs_unavailable", failure, retry_after_s=None)
        return self.jobs

    def _identity(self, model: Embedder) -> dict[str, Any]:
        return {**model.identity.to_dict(), "hop_s": self.settings.reference_hop_s}

    def _start_worker(self, model: Embedder, store: SegmentStore) -> SegmentEmbedder:
        s = self.settings
        if s.worker_list:
            # every worker must serve the model the index was built with (hop is per request)
            wanted = {k: v for k, v in store.identity.items() if k != "hop_s"}
            return RemoteWorkers(
                s.worker_list,
                wanted,
                self.metrics,
                token=s.worker_token,
                timeout_s=s.worker_timeout_s,
                max_in_flight=s.max_queue,
            )
        return InferenceWorker(
            model,
            self.metrics,
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
        )

    def close(self) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)
        self.jobs.stop()
        if self._worker is not None:
            self._worker.close()
        if self._store is not None:
            self._store.close()

    # -- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def core(self) -> Engine:
        """The engine, once the model and store are up (Unavailable until then)."""
        if not self.ready or self.engine is None:
            raise not_ready(self.load_error or "loading model and index")
        return self.engine

    def ingest_item(self, item: Item, replace: bool) -> AddResult:
        """The ingestion jobs' hook: one item through the engine."""
        return self.core().ingest_item(item, replace)

    def index_failure(self) -> str | None:
        """Why the open store cannot serve every request (None: it can)."""
        return self._store.failure if self._store is not None else None

    def failure(self) -> str | None:
        """Why the loaded service cannot serve every request, naming each part that cannot
        (None: all can); /readyz answers 503 `degraded` with it."""
        parts = [
            f"{name}: {why}"
            for name, why in (("index", self.index_failure()), ("ingestion", self.jobs_failure()))
            if why
        ]
        return "; ".join(parts) or None

    def identity(self) -> dict[str, Any]:
        """The model identity (with the reference hop) the store's vectors come from."""
        return self._identity(self.core().model)

    @property
    def queue_depth(self) -> int:
        return self._worker.depth if self._worker is not None else 0


def _scorer(calibration: Calibration) -> Callable[[float], float]:
    """A track distance -> the calibrated probability that it is a version."""
    return lambda distance: float(calibration.probability(distance))
