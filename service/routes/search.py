"""POST /v1/search: which reference tracks is this clip a version of, and where."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from refrain.service import schemas
from refrain.service.auth import require_read
from refrain.service.deps import EngineDep
from refrain.service.engine import MAX_TOP_K, SearchRequest
from refrain.service.forms import StrictFormRoute
from refrain.service.schemas import SearchResponse, responses

router = APIRouter(route_class=StrictFormRoute)


@router.post(
    "/v1/search",
    tags=["search"],
    dependencies=[Depends(require_read)],
    response_model=SearchResponse,
    responses=responses(400, 401, 403, 413, 415, 422, 502, 503),
)
async def search(
    engine: EngineDep,
    audio: UploadFile = File(
        ...,
        description="the query clip: 10 s or more match best; under 5 s, a short_clip "
        "warning; REFRAIN_MIN_QUERY_S..REFRAIN_MAX_QUERY_S (1-120 s by default), matched whole",
    ),
    top_k: int = Form(
        10, description=f"tracks to return, 1..REFRAIN_MAX_TOP_K (default {MAX_TOP_K})"
    ),
    reduction: str | None = Form(None, description="segment distance reduction, e.g. min, bpwr-10"),
    hop: float | None = Form(None, description="seconds between query segments"),
    transpositions: int | None = Form(
        None,
        description="also try the clip shifted by up to this many semitones each way, "
        "0..6 (6 tries every key); default: the server's REFRAIN_QUERY_TRANSPOSITIONS",
    ),
    verify: bool = Form(
        True,
        description="alignment verification: re-rank the best REFRAIN_VERIFY_CANDIDATES "
        "tracks by aligning the clip with them, and report aligned ranges, tempo ratio and "
        "key; false: segment distance only",
    ),
    tune: bool = Form(
        False,
        description="true: each hit verification located carries `tune`, the contour of the "
        "clip's tune over its first match and the reference's over the range it aligned "
        "with, on the clip's time axis (for display)",
    ),
) -> SearchResponse:
    request = SearchRequest(b"", top_k, reduction or None, hop, transpositions, verify, tune)
    request.check(engine.settings.max_top_k)  # before reading the upload
    result = await run_in_threadpool(engine.search, replace(request, audio=await audio.read()))
    return schemas.search_response(result)
