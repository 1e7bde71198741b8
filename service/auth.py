"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`.

Writes need a key unless REFRAIN_OPEN_WRITES (loopback use). Reads (search, tracks, jobs,
stats) need one once keys are configured, unless REFRAIN_OPEN_READS=true. /healthz and /readyz
are always open (probes carry no keys); /metrics is open unless REFRAIN_PROTECT_METRICS=true.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import ApiError


def _presented(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, open_access: bool) -> None:
    if open_access:
        return
    keys = request.app.state.settings.keys
    key = _presented(request)
    if not key:
        raise ApiError(
            401, "unauthorized", "an API key is required (Authorization: Bearer KEY or X-API-Key)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise ApiError(403, "forbidden", "the API key is not valid")


def require_write(request: Request) -> None:
    _check(request, request.app.state.settings.open_writes)


def require_read(request: Request) -> None:
    _check(request, request.app.state.settings.reads_open)


def require_metrics(request: Request) -> None:
    _check(request, not request.app.state.settings.protect_metrics)
