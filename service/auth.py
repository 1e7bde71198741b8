"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`.

Writes need a key unless REFRAIN_OPEN_WRITES (loopback use). Reads (search, tracks, jobs,
stats) need one once keys are configured, unless REFRAIN_OPEN_READS=true. /healthz and /readyz
are always open (probes carry no keys); /metrics is open unless REFRAIN_PROTECT_METRICS=true.
Both ways of sending a key are declared as OpenAPI security schemes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from refrain.service.deps import SettingsDep
from refrain.service.http_errors import ApiError, error_response
from refrain.service.settings import Settings

_bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="an API key from REFRAIN_API_KEYS"
)
_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="an API key from REFRAIN_API_KEYS",
)

Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
HeaderKey = Annotated[str | None, Security(_header)]


def key_problem(settings: Settings, open_access: bool, key: str | None) -> ApiError | None:
    """Why a request presenting `key` (None: none) may not pass; None when it may."""
    if open_access:
        return None
    if not key:
        return ApiError(
            401,
            "unauthorized",
            "an API key is required (Authorization: Bearer KEY or X-API-Key)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.keys):
        return ApiError(403, "forbidden", "the API key is not valid")
    return None


def _check(settings: Settings, open_access: bool, bearer: Bearer, header: HeaderKey) -> None:
    key = bearer.credentials.strip() if bearer is not None else header
    problem = key_problem(settings, open_access, key)
    if problem is not None:
        raise problem


class EarlyAuth:
    """401/403 before a body is read. FastAPI parses a multipart form before it runs the
    dependencies, so without this `POST /v1/tracks` (a write) and `POST /v1/search` (a read)
    would spool a whole unauthenticated upload first. The dependencies still check as well."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            open_access = {
                "/v1/tracks": self.settings.open_writes,
                "/v1/search": self.settings.reads_open,
            }.get(scope["path"])
            if open_access is not None:
                problem = key_problem(self.settings, open_access, _scope_key(scope))
                if problem is not None:
                    headers = {**(problem.headers or {}), "Connection": "close"}
                    response = error_response(
                        problem.status, problem.code, problem.message, headers
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _scope_key(scope: Scope) -> str | None:
    headers = dict(scope["headers"])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key is not None else None


def require_write(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, settings.open_writes, bearer, header)


def require_read(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, settings.reads_open, bearer, header)


def require_metrics(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, not settings.protect_metrics, bearer, header)
