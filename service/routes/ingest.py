"""Bulk ingestion: POST /v1/ingest creates a job (202), GET /v1/jobs/{job_id} reports on it.

A job's inputs are durable before the 202: uploaded files are copied (in chunks) into the
job's folder and fsynced, archives are extracted there, folders under the import root are
scanned (their files are read in place when the job runs). Uploads and archives that would
leave less than `min_free_bytes` free on the data volume are refused (507) before any write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from refrain.model.audio import AUDIO_EXTENSIONS
from refrain.service.archive import MAX_MANIFEST_BYTES, ArchiveLimits, copy_to_file, extract_archive
from refrain.service.auth import require_read, require_write
from refrain.service.deps import JobsDep, SettingsDep
from refrain.service.errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from refrain.service.forms import StrictFormRoute
from refrain.service.jobs import JobManager
from refrain.service.jobstore import JobState
from refrain.service.manifests import Manifest, parse_manifest, read_manifest_file
from refrain.service.schemas import Job, JobCreated, JobPage, responses
from refrain.service.settings import Settings
from refrain.service.sources import build_items, resolve_under, scan_folder
from refrain.service.storage import SpaceGuard, stream_size
from refrain.service.track_ids import basename_id

router = APIRouter(route_class=StrictFormRoute)

FORM_FIELDS = ("files", "archive", "manifest", "replace")


class PathIngest(BaseModel):
    """Ingest the audio files of a folder under the import root, read in place."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="folder relative to the import root, or absolute inside it")
    manifest: str | None = Field(
        None, description="manifest file, same rules (default: the folder's manifest.csv/.json)"
    )
    replace: bool = Field(
        False, description="replace tracks stored with other content instead of failing them"
    )


_FILE = {"type": "string", "format": "binary"}
_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": _FILE, "description": "audio files"},
                    "archive": {
                        **_FILE,
                        "description": "zip or tar (.gz, .bz2, .xz) of audio files",
                    },
                    "manifest": {
                        **_FILE,
                        "description": "CSV filename,track_id,title,artist,work_id "
                        "or a JSON list of objects with those keys",
                    },
                    "replace": {"type": "boolean", "default": False},
                },
            }
        },
        "application/json": {"schema": PathIngest.model_json_schema()},
    },
}


@router.post(
    "/v1/ingest",
    tags=["ingest"],
    status_code=202,
    dependencies=[Depends(require_write)],
    openapi_extra={"requestBody": _BODY},
    response_model=JobCreated,
    responses=responses(400, 401, 403, 413, 415, 422, 503, 507),
)
async def ingest(request: Request, jobs: JobsDep, settings: SettingsDep) -> JSONResponse:
    """multipart/form-data: `files` (one or more) or one `archive` (zip, tar, tar.gz/bz2/xz),
    optional `manifest` (CSV or JSON), optional `replace`. application/json: `{"path": ...,
    "manifest": ..., "replace": ...}` naming a folder under REFRAIN_IMPORT_ROOT."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        job = await _from_form(request, jobs, settings)
    elif kind == "application/json":
        job = await _from_json(request, jobs, settings)
    else:
        raise UnsupportedMedia(
            "unsupported_media_type",
            "expected multipart/form-data (files or archive, optional manifest) or "
            f'application/json ({{"path": ...}}), got {kind or "no content type"!r}',
        )
    return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job['job_id']}"})


@router.get(
    "/v1/jobs",
    tags=["ingest"],
    dependencies=[Depends(require_read)],
    response_model=JobPage,
    responses=responses(401, 403, 422, 503),
)
async def list_jobs(
    jobs: JobsDep,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
    state: JobState | None = Query(None, description="only jobs in this state"),
) -> dict:
    """Jobs newest first, with their counts and progress (without per-item errors)."""
    page, next_cursor = await run_in_threadpool(
        jobs.page, limit, cursor, state.value if state else None
    )
    return {"jobs": page, "next_cursor": next_cursor}


@router.get(
    "/v1/jobs/{job_id}",
    tags=["ingest"],
    dependencies=[Depends(require_read)],
    response_model=Job,
    response_model_exclude_unset=True,
    responses=responses(401, 403, 404, 422, 503),
)
async def get_job(
    jobs: JobsDep,
    job_id: str,
    items: bool = Query(False, description="also list every item with its state and result"),
) -> dict:
    job = await run_in_threadpool(jobs.get, job_id, items)
    if job is None:
        raise NotFound("job_not_found", f"no job {job_id[:64]!r}")
    return job


async def _from_form(request: Request, jobs: JobManager, settings: Settings) -> dict[str, Any]:
    form = await request.form(
        max_files=settings.max_archive_files + 2,
        max_fields=len(FORM_FIELDS) + 8,
        max_part_size=MAX_MANIFEST_BYTES,
    )
    try:
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise InvalidInput(
                "unknown_field", f"unknown form fields {unknown}; expected {', '.join(FORM_FIELDS)}"
            )
        files = form.getlist("files")
        archives = form.getlist("archive")
        if not all(isinstance(f, UploadFile) for f in files + archives):
            raise InvalidInput("invalid_request", "files and archive must be file uploads")
        if bool(files) == bool(archives) or len(archives) > 1:
            raise InvalidInput(
                "invalid_request", "send either files (one or more audio files) or one archive"
            )
        manifest = await _form_manifest(form.get("manifest"))
        replace = str(form.get("replace") or "").lower() in ("1", "true", "yes", "on")
        space = SpaceGuard(settings.data_dir, settings.min_free_bytes)
        uploads = cast(list[UploadFile], files)  # checked above: all file uploads
        if uploads:
            return await run_in_threadpool(submit_files, jobs, uploads, manifest, replace, space)
        limits = ArchiveLimits(
            settings.max_archive_files, settings.max_archive_bytes, settings.max_upload_bytes
        )
        return await run_in_threadpool(
            submit_archive, jobs, cast(UploadFile, archives[0]), manifest, replace, limits, space
        )
    finally:
        await form.close()


async def _form_manifest(value: Any) -> Manifest | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return parse_manifest(value.encode(), "manifest")
    data = await value.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise TooLarge(
            "manifest_too_large", f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes"
        )
    return parse_manifest(data, value.filename or "manifest")


async def _from_json(request: Request, jobs: JobManager, settings: Settings) -> dict[str, Any]:
    try:
        body = PathIngest.model_validate_json(await request.body())
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidInput("invalid_request", where) from None
    return await run_in_threadpool(submit_path, jobs, settings, body)


def submit_files(
    jobs: JobManager,
    uploads: list[UploadFile],
    manifest: Manifest | None,
    replace: bool,
    space: SpaceGuard,
) -> dict[str, Any]:
    """Uploaded files -> a job; default track id and title: the file name without extension."""
    space.require(sum(stream_size(up.file) for up in uploads), f"{len(uploads)} uploaded files")
    with jobs.staging() as st:
        found = []
        for n, up in enumerate(uploads):
            name = (up.filename or "").strip() or f"file{n}"
            ext = Path(name).suffix.lower()
            found.append((name, st.files / f"{n:06d}{ext if ext in AUDIO_EXTENSIONS else ''}"))
        items = build_items(found, manifest, owned=True, default_id=basename_id)
        for up, (_, path) in zip(uploads, found, strict=False):
            up.file.seek(0)
            copy_to_file(up.file, path)
        return jobs.create(st, items, "files", replace=replace)


def submit_archive(
    jobs: JobManager,
    upload: UploadFile,
    manifest: Manifest | None,
    replace: bool,
    limits: ArchiveLimits,
    space: SpaceGuard,
) -> dict[str, Any]:
    """An archive -> a job of its audio members; a manifest sent beside the archive wins over
    the one inside. Default track id: the member path without extension."""

    def check_space(n: int) -> None:
        space.require(n, "the archive's audio files")

    with jobs.staging() as st:
        out = extract_archive(upload.file, st.files, limits, check_space)
        if manifest is None and out.manifest is not None:
            manifest = parse_manifest(out.manifest[1], out.manifest[0])
        items = build_items(out.files, manifest, owned=True)
        return jobs.create(st, items, "archive", ignored=out.ignored, replace=replace)


def submit_path(jobs: JobManager, settings: Settings, body: PathIngest) -> dict[str, Any]:
    """A folder under the import root -> a job reading its audio files in place. Default
    track id: the path relative to the folder without extension."""
    root = settings.import_root
    folder = resolve_under(root, body.path)  # Forbidden when no import root is set
    assert root is not None
    found, ignored, inside = scan_folder(folder, root, settings.max_archive_files)
    manifest = None
    if body.manifest:
        file = resolve_under(root, body.manifest, "manifest")
        if not file.is_file():
            raise InvalidInput("manifest_not_found", f"manifest {body.manifest!r} is not a file")
        manifest = parse_manifest(read_manifest_file(file), file.name)
    elif inside:
        name = "manifest.csv" if "manifest.csv" in inside else "manifest.json"
        manifest = parse_manifest(inside[name], name)
    items = build_items(found, manifest, owned=False)
    with jobs.staging() as st:
        return jobs.create(st, items, "path", ignored=ignored, replace=body.replace)
