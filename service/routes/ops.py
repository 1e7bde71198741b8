"""Liveness, readiness, metrics and index statistics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from refrain.service import schemas
from refrain.service.auth import require_metrics, require_read
from refrain.service.deps import EngineDep, MetricsDep, RuntimeDep
from refrain.service.forms import StrictFormRoute
from refrain.service.schemas import Health, Readiness, Stats, responses

router = APIRouter(route_class=StrictFormRoute)


@router.get("/healthz", tags=["ops"], response_model=Health)
async def healthz() -> dict:
    return {"status": "alive"}


@router.get(
    "/readyz",
    tags=["ops"],
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "loading, failed or degraded"}},
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    failure = runtime.failure() if runtime.ready else None
    if failure:  # loaded, but the index or ingestion cannot serve everything
        return JSONResponse(
            {"status": "degraded", "error": failure}, status_code=503, headers={"Retry-After": "5"}
        )
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    body = {"status": "failed" if runtime.load_error else "loading", "error": runtime.load_error}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/metrics",
    tags=["ops"],
    dependencies=[Depends(require_metrics)],
    response_class=PlainTextResponse,
    # a key only with REFRAIN_PROTECT_METRICS: the empty requirement makes it optional
    openapi_extra={"security": [{}, {"bearer": []}, {"apiKey": []}]},
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"},
        **responses(401, 403),
    },
)
async def metrics(runtime: RuntimeDep, registry: MetricsDep) -> Response:
    if runtime.ready and runtime.engine is not None:
        await run_in_threadpool(runtime.engine.refresh_metrics)
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/stats",
    tags=["catalog"],
    dependencies=[Depends(require_read)],
    response_model=Stats,
    responses=responses(401, 403, 503),
)
async def stats(runtime: RuntimeDep, engine: EngineDep) -> Stats:
    st = await run_in_threadpool(engine.store.stats)
    return schemas.stats(st, runtime.identity(), runtime.queue_depth)
