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

from refrain.service.deps import SettingsDep
from refrain.service.errors import ApiError
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


def _check(settings: Settings, open_access: bool, bearer: Bearer, header: HeaderKey) -> None:
    if open_access:
        return
    key = bearer.credentials.strip() if bearer is not None else header
    if not key:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required (Authorization: Bearer KEY or X-API-Key)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.keys):
        raise ApiError(403, "forbidden", "the API key is not valid")


def require_write(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, settings.open_writes, bearer, header)


def require_read(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, settings.reads_open, bearer, header)


def require_metrics(settings: SettingsDep, bearer: Bearer, header: HeaderKey) -> None:
    _check(settings, not settings.protect_metrics, bearer, header)
