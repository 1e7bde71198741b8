"""POST /v1/search: which reference tracks is this clip a version of, and where."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from model.reduce import Reduction
from service.auth import require_read
from service.errors import ApiError

router = APIRouter()

MAX_TOP_K = 100


@router.post("/v1/search", tags=["search"], dependencies=[Depends(require_read)])
async def search(
    request: Request,
    audio: UploadFile = File(..., description="the query clip (5-60 s is typical)"),
    top_k: int = Form(10, description=f"tracks to return, 1..{MAX_TOP_K}"),
    reduction: str | None = Form(None, description="segment distance reduction, e.g. min, bpwr-10"),
    hop: float | None = Form(None, description="seconds between query segments"),
    transpositions: int | None = Form(
        None, description="also try the clip shifted by up to this many semitones each way, "
        "0..6 (6 tries every key); default: the server's REFRAIN_QUERY_TRANSPOSITIONS"),
) -> dict:
    if not 1 <= top_k <= MAX_TOP_K:
        raise ApiError(422, "invalid_parameter", f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    if reduction:
        try:
            Reduction.parse(reduction)
        except ValueError as e:
            raise ApiError(422, "unknown_reduction", str(e)) from None
    if hop is not None and not 0.5 <= hop <= 20:
        raise ApiError(422, "invalid_parameter", f"hop must be in 0.5..20 seconds, got {hop}")
    if transpositions is not None and not 0 <= transpositions <= 6:
        raise ApiError(422, "invalid_parameter",
                       f"transpositions must be in 0..6 semitones, got {transpositions}")
    runtime = request.app.state.runtime
    runtime.require_ready()
    data = await audio.read()
    return await run_in_threadpool(
        runtime.search, data, top_k, reduction or None, hop, transpositions
    )
