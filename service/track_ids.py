"""The track id rule, written once: what a valid id is, the error that names those that are
not, and the ids made from file names when a client gives none.

A track id is what the catalog is keyed on and what `GET /v1/tracks/{track_id}` takes in its
path: `TRACK_ID_RULE` says in words what `valid_track_id` checks. POST /v1/tracks, the
ingestion jobs (manifests and file names) and the catalogs `refrain ingest` and `refrain index
build` read all check ids here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

from refrain.service.errors import InvalidInput, listed

MAX_TRACK_ID_CHARS = 200
_PART = re.compile(r"^[\w.\-:@+()' ]{1,200}$")  # one '/'-separated part of an id
_UNSAFE_CHARS = re.compile(r"[^\w.\-:@+()' ]")

TRACK_ID_RULE = (
    f"1-{MAX_TRACK_ID_CHARS} characters of letters, digits, spaces and ._-:@+()' in "
    "'/'-separated parts without leading or trailing spaces and other than '.' or '..'"
)


def valid_track_id(track_id: str) -> bool:
    """Whether `track_id` follows `TRACK_ID_RULE`."""
    return len(track_id) <= MAX_TRACK_ID_CHARS and all(
        _PART.match(part) and part.strip() == part and part not in (".", "..")
        for part in track_id.split("/")
    )


def invalid_track_ids(track_ids: Sequence[str]) -> InvalidInput:
    """The error for ids that break the rule: the rule, then the ids (50 characters of each,
    at most 20 of them)."""
    subject = "track_id" if len(track_ids) == 1 else "track ids"
    return InvalidInput(
        "invalid_track_id",
        f"{subject} must be {TRACK_ID_RULE}, got {listed([t[:50] for t in track_ids])}",
    )


def check_track_id(track_id: str) -> str:
    """`track_id` itself if valid, else InvalidInput invalid_track_id."""
    if not valid_track_id(track_id):
        raise invalid_track_ids([track_id])
    return track_id


def default_track_id(relative: str) -> str:
    """A file's path without extension, made a valid track id ('/' kept)."""
    stem = str(PurePosixPath(relative).with_suffix("")) if relative.strip("/.") else "_"
    parts = [_UNSAFE_CHARS.sub("_", p).strip() or "_" for p in stem.split("/") if p]
    return "/".join(parts)[:MAX_TRACK_ID_CHARS].rstrip("/ ") or "_"


def basename_id(filename: str) -> str:
    """Default id of an uploaded file: its name without folders and extension."""
    return default_track_id(PurePosixPath(filename.replace("\\", "/")).name)
