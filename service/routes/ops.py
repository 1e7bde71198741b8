"""Liveness, readiness, metrics and index statistics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.auth import require_metrics, require_read

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
    failure = runtime.index_failure() if runtime.ready else None
    if failure:  # loaded, but the index needs a catch-up or a reopen to serve everything
        return JSONResponse({"status": "degraded", "error": failure}, status_code=503,
                            headers={"Retry-After": "5"})
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    body = {"status": "failed" if runtime.load_error else "loading", "error": runtime.load_error}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["ops"], dependencies=[Depends(require_metrics)])
async def metrics(request: Request) -> Response:
    runtime = request.app.state.runtime
    if runtime.ready:
        await run_in_threadpool(runtime.refresh_index_metrics)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", tags=["catalog"], dependencies=[Depends(require_read)])
async def stats(request: Request) -> dict:
    runtime = request.app.state.runtime
    runtime.require_ready()
    st = await run_in_threadpool(runtime.index.stats)
    return {
        "index": asdict(st),
        "model": runtime.identity(),
        "queue_depth": runtime.worker.depth,
    }
