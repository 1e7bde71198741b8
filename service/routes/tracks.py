"""Reference tracks: add one, get, delete, list."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from refrain.index import AddResult
from refrain.service import schemas
from refrain.service.auth import require_read, require_write
from refrain.service.deps import EngineDep
from refrain.service.engine import TrackMeta
from refrain.service.forms import StrictFormRoute
from refrain.service.schemas import AddedTrack, Deleted, Track, TrackPage, responses
from refrain.service.sources import check_metadata
from refrain.service.track_ids import check_track_id

router = APIRouter(route_class=StrictFormRoute)


@router.post(
    "/v1/tracks",
    tags=["catalog"],
    dependencies=[Depends(require_write)],
    status_code=201,
    response_model=AddedTrack,
    responses={
        200: {
            "model": AddedTrack,
            "description": "this id already holds the same audio: nothing was written",
        },
        **responses(400, 401, 403, 409, 413, 415, 422, 502, 503, 507),
    },
)
async def add_track(
    engine: EngineDep,
    audio: UploadFile = File(..., description="the reference recording"),
    track_id: str | None = Form(None, description="unique id; generated when absent"),
    title: str = Form(""),
    artist: str = Form(""),
    work_id: str | None = Form(None, description="the work this track is a version of"),
    replace: bool = Form(False, description="replace a track with the same id and other audio"),
) -> JSONResponse:
    meta = TrackMeta(
        check_track_id(track_id) if track_id else uuid.uuid4().hex, title, artist, work_id
    )
    check_metadata(
        {"track_id": meta.track_id, "title": title, "artist": artist, "work_id": work_id}
    )
    data = await audio.read()
    # the engine refuses (507) a write that would leave the data volume short of its reserve
    result, track = await run_in_threadpool(engine.add_reference, data, meta, replace)
    status = 200 if result is AddResult.UNCHANGED else 201
    return JSONResponse(schemas.added_track(result, track).model_dump(), status_code=status)


@router.get(
    "/v1/tracks/{track_id:path}",
    tags=["catalog"],
    dependencies=[Depends(require_read)],
    response_model=Track,
    responses=responses(401, 403, 404, 422, 503),
)
async def get_track(engine: EngineDep, track_id: str) -> Track:
    return schemas.track(await run_in_threadpool(engine.get_track, track_id))


@router.delete(
    "/v1/tracks/{track_id:path}",
    tags=["catalog"],
    dependencies=[Depends(require_write)],
    response_model=Deleted,
    responses=responses(401, 403, 404, 422, 503, 507),
)
async def delete_track(engine: EngineDep, track_id: str) -> dict:
    await run_in_threadpool(engine.delete_track, track_id)
    return {"deleted": track_id}


@router.get(
    "/v1/tracks",
    tags=["catalog"],
    dependencies=[Depends(require_read)],
    response_model=TrackPage,
    responses=responses(401, 403, 422, 503),
)
async def list_tracks(
    engine: EngineDep,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None),
) -> TrackPage:
    tracks, next_cursor = await run_in_threadpool(engine.list_tracks, limit, cursor)
    return schemas.track_page(tracks, next_cursor)
