"""Every failure becomes a JSON error `{"error": {"code", "message"}}` with a 4xx/5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import (
    CatalogUnavailableError,
    IdentityMismatchError,
    InsufficientStorageError,
    SegmentIndexError,
    TrackExistsError,
    TrackNotFoundError,
)
from index.milvus import BackendUnavailableError
from model.audio import AudioDecodeError, AudioTooLongError, UnsupportedAudioError
from service.remote_worker import WorkerRejected, WorkersUnavailable
from service.worker import Overloaded

log = logging.getLogger("refrain.service")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def classify(exc: Exception) -> ApiError:
    """Map library exceptions to API errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AudioTooLongError):
        return ApiError(422, "audio_too_long", str(exc))
    if isinstance(exc, UnsupportedAudioError):
        return ApiError(415, "unsupported_audio", str(exc))
    if isinstance(exc, AudioDecodeError):
        return ApiError(422, "bad_audio", str(exc))
    if isinstance(exc, WorkersUnavailable):
        return ApiError(503, "workers_unavailable", f"{exc}; retry later", {"Retry-After": "5"})
    if isinstance(exc, WorkerRejected):
        return ApiError(502, "worker_rejected", str(exc))
    if isinstance(exc, Overloaded):
        return ApiError(503, "overloaded", f"{exc}; retry later", {"Retry-After": "1"})
    if isinstance(exc, TrackNotFoundError):
        return ApiError(404, "track_not_found", str(exc))
    if isinstance(exc, TrackExistsError):
        return ApiError(409, "track_exists", str(exc))
    if isinstance(exc, BackendUnavailableError):
        return ApiError(503, "index_unavailable", f"{exc}; retry later", {"Retry-After": "5"})
    if isinstance(exc, InsufficientStorageError):
        return ApiError(507, "insufficient_storage", str(exc))
    if isinstance(exc, CatalogUnavailableError):
        return ApiError(503, "index_unavailable", f"{exc}; retry later", {"Retry-After": "5"})
    if isinstance(exc, IdentityMismatchError):
        return ApiError(503, "index_model_mismatch", str(exc))
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, "internal", f"internal error ({type(exc).__name__})")


def install(app: FastAPI) -> None:
    def count(request: Request, code: str) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(code).inc()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}")
        count(request, "invalid_request")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        count(request, code)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        err = classify(exc)
        count(request, err.code)
        return error_response(err.status, err.code, err.message, err.headers)

    # Known failures are answered by the exception middleware (no traceback in the log);
    # anything else reaches the server-error handler as a logged 500.
    for known in (ApiError, AudioDecodeError, Overloaded, SegmentIndexError, WorkerRejected):
        app.add_exception_handler(known, _known)
    app.add_exception_handler(Exception, _known)
