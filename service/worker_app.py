"""`refrain worker`: the inference worker as its own HTTP service, for GPU nodes.

    POST /v1/embed?hop=5.0   body: little-endian float32 mono PCM at the model's rate (16 kHz)
        -> 200 application/octet-stream: (S, zdim) float32, row-major, with the headers
           X-Refrain-Shape: "S,zdim", X-Refrain-Model: weights hash, X-Refrain-Identity: JSON
        -> with `Accept: application/json`: {"identity", "hop_s", "shape", "embeddings"}
    GET /healthz   alive;  GET /readyz   200 with the model identity once loaded, else 503
    GET /metrics   the worker's own Prometheus metrics (queue depth, batch sizes, ...)

Requests share one `InferenceWorker`, so concurrent requests from any number of API
processes are batched together. Decoding and validation of audio stay in the API; the worker
only checks that the PCM is well formed. With `REFRAIN_WORKER_TOKEN` set, /v1/embed requires
`Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from refrain import __version__
from refrain.model.embedder import Embedder, load_model
from refrain.service import http_errors
from refrain.service.app import BodyLimitMiddleware, MetricsMiddleware
from refrain.service.http_errors import ApiError
from refrain.service.metrics import Metrics
from refrain.service.settings import Settings
from refrain.service.worker import InferenceWorker

log = logging.getLogger("refrain.worker")

MIN_HOP_S, MAX_HOP_S = 0.05, 20.0
MAX_SHIFT = 12  # semitones either way


class WorkerState:
    """The model and its batching queue, loaded in the background at start-up."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: Embedder | None = None
        self.worker: InferenceWorker | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()

    def load(self) -> None:
        s = self.settings
        try:
            device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(s.model, device=device)
            self.worker = InferenceWorker(
                self.model,
                self.metrics,
                max_batch=s.max_batch,
                max_wait_s=s.max_wait_ms / 1000,
                max_queue=s.max_queue,
            )
            self.ready.set()
            self.metrics.ready.set(1)
            log.info(
                "worker ready: model %s on %s", self.model.identity.weights_sha256[:12], device
            )
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("worker failed to start: %s", self.load_error)
            raise

    def close(self) -> None:
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.worker is not None:
            self.worker.close()

    def identity(self) -> dict[str, Any]:
        assert self.model is not None
        return self.model.identity.to_dict()

    @property
    def max_samples(self) -> int:
        assert self.model is not None
        s = self.settings
        return int(max(s.max_reference_s, s.max_query_s) * self.model.sample_rate)


def create_worker_app(settings: Settings | None = None, load_in_background: bool = True) -> FastAPI:
    """The internal embedding service; /readyz answers 503 until the model is loaded."""
    settings = settings or Settings()
    metrics = Metrics()
    state = WorkerState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load_in_background:
            loader = threading.Thread(target=_load_quietly, args=(state,), daemon=True)
            loader.start()
        else:
            state.load()
        try:
            yield
        finally:
            if loader is not None:
                loader.join()
            state.close()

    app = FastAPI(
        title="Refrain inference worker",
        version=__version__,
        lifespan=lifespan,
        description="Internal: audio samples in, CLEWS segment embeddings out.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.worker = state
    http_errors.install(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        if state.ready.is_set():
            assert state.worker is not None
            return JSONResponse(
                {"status": "ready", "identity": state.identity(), "queue_depth": state.worker.depth}
            )
        body = {"status": "failed" if state.load_error else "loading", "error": state.load_error}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"])
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed", tags=["embed"])
    async def embed(request: Request, hop: float = 5.0, shifts: str = "") -> Response:
        _authorize(request, settings.worker_token)
        if not state.ready.is_set():
            why = f" ({state.load_error})" if state.load_error else " (loading the model)"
            raise ApiError(503, "not_ready", f"worker is not ready{why}", {"Retry-After": "5"})
        if not (math.isfinite(hop) and MIN_HOP_S <= hop <= MAX_HOP_S):
            raise ApiError(
                422,
                "invalid_parameter",
                f"hop must be in {MIN_HOP_S:g}..{MAX_HOP_S:g} seconds, got {hop}",
            )
        shift_list = _shifts(shifts)
        wave = _pcm(await request.body(), state.max_samples)
        assert state.worker is not None
        z = await state.worker.embed_async(wave, hop, shift_list)
        identity = state.identity()
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(
                {
                    "identity": identity,
                    "hop_s": hop,
                    "shape": list(z.shape),
                    "embeddings": z.tolist(),
                }
            )
        return Response(
            np.ascontiguousarray(z, dtype="<f4").tobytes(),
            media_type="application/octet-stream",
            headers={
                "X-Refrain-Shape": f"{z.shape[0]},{z.shape[1]}",
                "X-Refrain-Model": identity["weights_sha256"],
                "X-Refrain-Identity": json.dumps(identity, sort_keys=True),
            },
        )

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _shifts(text: str) -> tuple[int, ...]:
    """`shifts=-2,0,3` -> (-2, 0, 3): CQT shifts in semitones, each embedded in turn."""
    if not text:
        return (0,)
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ApiError(422, "invalid_parameter", f"shifts must be integers, got {text!r}") from None
    if len(values) > 2 * MAX_SHIFT + 1 or any(abs(v) > MAX_SHIFT for v in values):
        raise ApiError(
            422,
            "invalid_parameter",
            f"shifts must be at most {2 * MAX_SHIFT + 1} values in "
            f"-{MAX_SHIFT}..{MAX_SHIFT}, got {text!r}",
        )
    return values


def _authorize(request: Request, token: str) -> None:
    if not token:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "the worker token is missing or wrong",
            {"WWW-Authenticate": "Bearer"},
        )


def _pcm(body: bytes, max_samples: int) -> np.ndarray:
    """Request body -> 1-D float32 waveform, or a 422 that says what was wrong."""
    if not body or len(body) % 4:
        raise ApiError(
            422,
            "bad_pcm",
            "expected a non-empty body of little-endian float32 "
            f"samples (a multiple of 4 bytes), got {len(body)} bytes",
        )
    if len(body) // 4 > max_samples:
        raise ApiError(
            422, "audio_too_long", f"expected at most {max_samples} samples, got {len(body) // 4}"
        )
    wave = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.isfinite(wave).all():
        raise ApiError(422, "bad_pcm", "the samples contain NaN or infinite values")
    return wave


def _load_quietly(state: WorkerState) -> None:
    try:
        state.load()
    except Exception:  # reported by /readyz and the log
        log.debug("worker load failed", exc_info=True)
