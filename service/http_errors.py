"""Every failure becomes a JSON error `{"error": {"code", "message"}}` with a 4xx/5xx status.

Domain errors (`exceptions`) get their status from `STATUS`, the only table of them; `ApiError`
is for the HTTP layer's own refusals (authentication, the shape of a request). A 405 lists in
`Allow` every method the path takes, over all the routes that share it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from refrain.index import SegmentIndexError
from refrain.model.audio import AudioDecodeError
from refrain.service import errors as ex
from refrain.service.remote_worker import WorkerRejected
from refrain.service.worker import Overloaded

log = logging.getLogger("refrain.service")

# the one place where a kind of failure becomes an HTTP status
STATUS: dict[type[ex.RefrainError], int] = {
    ex.InvalidInput: 422,
    ex.UnsupportedMedia: 415,
    ex.TooLarge: 413,
    ex.NotFound: 404,
    ex.Conflict: 409,
    ex.Forbidden: 403,
    ex.InsufficientStorage: 507,
    ex.Unavailable: 503,
    ex.Misconfigured: 503,
    ex.UpstreamFailed: 502,
    ex.Internal: 500,
}


class ApiError(StarletteHTTPException):
    """An error of the HTTP layer itself (authentication, the request's shape). An HTTP
    exception, so that FastAPI lets it through when it is raised while a body is parsed."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, message, headers)
        self.status = status
        self.code = code
        self.message = message


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def status_of(err: ex.RefrainError) -> int:
    for kind in type(err).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def classify(exc: BaseException) -> ApiError:
    """Any exception as the API error it is answered with."""
    if isinstance(exc, ApiError):
        return exc
    err = ex.as_domain_error(exc)
    headers = None
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, round(err.retry_after_s)))}
    return ApiError(status_of(err), err.code, err.message, headers)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of `app` answers at the request's path. A router answers 405
    with the methods of the first route whose path matches, and `/v1/tracks` has two."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):
        regex = getattr(route, "path_regex", None)
        if route.methods and regex is not None and regex.match(path):
            methods |= route.methods
    return sorted(methods)


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
        codes = {
            400: "malformed_request",
            404: "not_found",
            405: "method_not_allowed",
            422: "invalid_request",
        }
        code = codes.get(exc.status_code, "http_error")
        count(request, code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := allowed_methods(request.app, request.scope)):
            headers["Allow"] = ", ".join(methods)
        return error_response(exc.status_code, code, str(exc.detail), headers or None)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        err = classify(exc)
        count(request, err.code)
        return error_response(err.status, err.code, err.message, err.headers)

    # Known failures are answered by the exception middleware (no traceback in the log);
    # anything else reaches the server-error handler as a logged 500.
    for known in (
        ApiError,
        ex.RefrainError,
        AudioDecodeError,
        Overloaded,
        SegmentIndexError,
        WorkerRejected,
    ):
        app.add_exception_handler(known, _known)
    app.add_exception_handler(Exception, _known)
