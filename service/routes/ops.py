"""Liveness, readiness, metrics and index statistics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from refrain.service.auth import require_metrics, require_read
from refrain.service.deps import EngineDep, MetricsDep, RuntimeDep

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", tags=["ops"])
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    failure = runtime.index_failure() if runtime.ready else None
    if failure:  # loaded, but the index needs a catch-up or a reopen to serve everything
        return JSONResponse({"status": "degraded", "error": failure}, status_code=503,
                            headers={"Retry-After": "5"})
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    body = {"status": "failed" if runtime.load_error else "loading", "error": runtime.load_error}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["ops"], dependencies=[Depends(require_metrics)])
async def metrics(runtime: RuntimeDep, registry: MetricsDep) -> Response:
    if runtime.ready and runtime.engine is not None:
        await run_in_threadpool(runtime.engine.refresh_metrics)
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", tags=["catalog"], dependencies=[Depends(require_read)])
async def stats(runtime: RuntimeDep, engine: EngineDep) -> dict:
    st = await run_in_threadpool(engine.store.stats)
    return {"index": asdict(st), "model": runtime.identity(), "queue_depth": runtime.queue_depth}
