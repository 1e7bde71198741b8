"""Reference tracks: add one, get, delete, list."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from refrain.index import AddResult
from refrain.service.auth import require_read, require_write
from refrain.service.deps import EngineDep, SettingsDep
from refrain.service.engine import TrackMeta
from refrain.service.errors import InvalidInput
from refrain.service.forms import StrictFormRoute
from refrain.service.schemas import AddedTrack, Deleted, Track, TrackPage, responses
from refrain.service.sources import check_metadata, valid_track_id
from refrain.service.storage import SpaceGuard, stream_size

router = APIRouter(route_class=StrictFormRoute)


def check_track_id(track_id: str) -> str:
    if not valid_track_id(track_id):
        raise InvalidInput(
            "invalid_track_id",
            "track_id must be 1-200 characters of letters, digits, spaces and ._-:@+()' in "
            "'/'-separated parts without leading or trailing spaces and other than '.' or '..', "
            f"got {track_id[:50]!r}",
        )
    return track_id


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
        **responses(401, 403, 409, 413, 415, 422, 502, 503, 507),
    },
)
async def add_track(
    engine: EngineDep,
    settings: SettingsDep,
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
    # the index stores far less than the audio; its size is the bound the guard can know
    space = SpaceGuard(settings.data_dir, settings.min_free_bytes)
    await run_in_threadpool(space.require, stream_size(audio.file), "the track")
    data = await audio.read()
    result, track = await run_in_threadpool(engine.add_reference, data, meta, replace)
    status = 200 if result is AddResult.UNCHANGED else 201
    return JSONResponse({**track.to_json(), "result": result.value}, status_code=status)


@router.get(
    "/v1/tracks/{track_id:path}",
    tags=["catalog"],
    dependencies=[Depends(require_read)],
    response_model=Track,
    responses=responses(401, 403, 404, 422, 503),
)
async def get_track(engine: EngineDep, track_id: str) -> dict:
    track = await run_in_threadpool(engine.get_track, track_id)
    return track.to_json()


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
) -> dict:
    tracks, next_cursor = await run_in_threadpool(engine.list_tracks, limit, cursor)
    return {"tracks": [t.to_json() for t in tracks], "next_cursor": next_cursor}
