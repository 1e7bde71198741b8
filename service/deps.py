"""Typed FastAPI dependencies: what a handler needs, without reading `request.app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from refrain.service.engine import Engine
from refrain.service.jobs import JobManager
from refrain.service.metrics import Metrics
from refrain.service.runtime import Runtime
from refrain.service.settings import Settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Engine:
    """The engine; 503 not_ready while the model and index load."""
    return runtime.core()


def get_jobs(runtime: Annotated[Runtime, Depends(get_runtime)]) -> JobManager:
    """The job manager; 503 while loading, or while the job database cannot be opened."""
    return runtime.jobs_ready()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
