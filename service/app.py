"""The FastAPI application factory."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from refrain import __version__
from refrain.service import http_errors, pages
from refrain.service.auth import EarlyAuth
from refrain.service.metrics import Metrics
from refrain.service.routes import ingest, ops, search, tracks
from refrain.service.runtime import Runtime
from refrain.service.settings import Settings

log = logging.getLogger("refrain.service")
request_log = logging.getLogger("refrain.requests")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, send)
        seen = 0
        started = exceeded = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # a parser turned the refusal into an error of its own: answer 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(scope, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        response = http_errors.error_response(
            413,
            "payload_too_large",
            f"request body exceeds {self.limit} bytes",
            {"Connection": "close"},
        )
        await response(scope, _drain, send)


async def _drain() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Request counts and latency by route template, method and status; with `json_log`, one
    JSON line per request on the `refrain.requests` logger. Every response carries an
    `X-Request-ID` (the client's, if it sent a sane one, else a new one), as does its log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, json_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.json_log = json_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(seconds)
            if self.json_log:
                request_log.info(
                    json.dumps(
                        {
                            "method": method,
                            "route": path,
                            "path": scope.get("path", ""),
                            "status": status,
                            "latency_ms": round(seconds * 1000, 2),
                            "request_id": request_id,
                        }
                    )
                )


def create_app(settings: Settings | None = None, load_in_background: bool = True) -> FastAPI:
    """The Refrain API. The model and index load in a background thread at start-up;
    /readyz answers 503 until they are loaded."""
    settings = settings or Settings()
    metrics = Metrics()
    runtime = Runtime(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            loader = threading.Thread(target=_load_quietly, args=(runtime,), daemon=True)
            loader.start()
        else:
            runtime.load()
        try:
            yield
        finally:
            if load_in_background:
                loader.join()
            runtime.close()

    app = FastAPI(
        title="Refrain",
        version=__version__,
        lifespan=lifespan,
        description="Find musical versions of audio clips in a reference catalog.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = runtime
    http_errors.install(app)
    pages.install(app)
    for module in (search, tracks, ingest, ops):
        app.include_router(module.router)
    app.add_middleware(EarlyAuth, settings=settings)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, json_log=settings.log_requests == "json")
    return app


def _load_quietly(runtime: Runtime) -> None:
    with contextlib.suppress(Exception):  # reported by /readyz and the log
        runtime.load()
