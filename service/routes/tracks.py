"""Reference tracks: add one, get, delete, list."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from index import AddResult
from service.auth import require_read, require_write
from service.errors import ApiError
from service.sources import check_metadata, valid_track_id
from service.storage import SpaceGuard, stream_size

router = APIRouter()

def check_track_id(track_id: str) -> str:
    if not valid_track_id(track_id):
        raise ApiError(
            422, "invalid_track_id",
            "track_id must be 1-200 characters of letters, digits, spaces and ._-:@+()' in "
            "'/'-separated parts without leading or trailing spaces and other than '.' or '..', "
            f"got {track_id[:50]!r}",
        )
    return track_id


@router.post("/v1/tracks", tags=["catalog"], dependencies=[Depends(require_write)])
async def add_track(
    request: Request,
    audio: UploadFile = File(..., description="the reference recording"),
    track_id: str | None = Form(None, description="unique id; generated when absent"),
    title: str = Form(""),
    artist: str = Form(""),
    work_id: str | None = Form(None, description="the work this track is a version of"),
    replace: bool = Form(False, description="replace a track with the same id and other audio"),
) -> JSONResponse:
    runtime = request.app.state.runtime
    runtime.require_ready()
    meta = {
        "track_id": check_track_id(track_id) if track_id else uuid.uuid4().hex,
        "title": title, "artist": artist, "work_id": work_id,
    }
    check_metadata(meta)
    # the index stores far less than the audio; its size is the bound the guard can know
    space = SpaceGuard(runtime.settings.data_dir, runtime.settings.min_free_bytes)
    await run_in_threadpool(space.require, stream_size(audio.file), "the track")
    data = await audio.read()
    result, track = await run_in_threadpool(runtime.add_reference, data, meta, replace)
    status = 200 if result is AddResult.UNCHANGED else 201
    return JSONResponse({**track.to_json(), "result": result.value}, status_code=status)


@router.get("/v1/tracks/{track_id:path}", tags=["catalog"], dependencies=[Depends(require_read)])
async def get_track(request: Request, track_id: str) -> dict:
    runtime = request.app.state.runtime
    runtime.require_ready()
    track = await run_in_threadpool(runtime.index.get_track, track_id)
    if track is None:
        raise ApiError(404, "track_not_found", f"no track {track_id!r}")
    return track.to_json()


@router.delete("/v1/tracks/{track_id:path}", tags=["catalog"], dependencies=[Depends(require_write)])
async def delete_track(request: Request, track_id: str) -> dict:
    runtime = request.app.state.runtime
    runtime.require_ready()
    if not await run_in_threadpool(runtime.index.delete_track, track_id):
        raise ApiError(404, "track_not_found", f"no track {track_id!r}")
    runtime.refresh_index_metrics()
    return {"deleted": track_id}


@router.get("/v1/tracks", tags=["catalog"], dependencies=[Depends(require_read)])
async def list_tracks(
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None),
) -> dict:
    runtime = request.app.state.runtime
    runtime.require_ready()
    tracks, next_cursor = await run_in_threadpool(runtime.index.list_tracks, limit, cursor)
    return {"tracks": [t.to_json() for t in tracks], "next_cursor": next_cursor}
