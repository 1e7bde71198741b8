"""Where a bulk ingestion job's files come from, and the items they become.

A job is a list of `Item`s, built from uploaded files, the audio members of an archive, or
the audio files of a folder under the import root. An optional manifest (`manifests`) gives a
file its metadata; a file it does not name gets defaults from its name. Every problem with
the request is found here, before a job exists: manifest rows naming absent files, duplicate
file names or track ids, invalid track ids, no audio at all.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from refrain.model.audio import AUDIO_EXTENSIONS
from refrain.service.archive import MANIFEST_NAMES
from refrain.service.errors import Forbidden, InvalidInput, TooLarge, listed
from refrain.service.manifests import Manifest, read_manifest_file
from refrain.service.track_ids import default_track_id, invalid_track_ids, valid_track_id

# Longest metadata values, in characters: a title is returned with every search hit and
# listing, so an unbounded one (a 900 kB title) would weigh on every answer.
MAX_METADATA_CHARS = {"title": 500, "artist": 500, "work_id": 200}


@dataclass(frozen=True)
class Item:
    filename: str  # as the client named it: upload name, archive member, path in the folder
    path: Path  # where its bytes are
    owned: bool  # a copy the service stored (deleted once final) or the user's own file
    track_id: str
    title: str = ""
    artist: str = ""
    work_id: str | None = None


def metadata_problem(fields: dict[str, str | None]) -> str | None:
    """What is wrong with a track's title, artist and work id (None: nothing)."""
    for name, limit in MAX_METADATA_CHARS.items():
        value = fields.get(name) or ""
        if len(value) > limit:
            return f"{name} must be at most {limit} characters, got {len(value)}"
        if "\x00" in value:
            return f"{name} must not contain NUL characters"
    return None


def check_metadata(fields: dict[str, str | None]) -> None:
    problem = metadata_problem(fields)
    if problem:
        raise InvalidInput("invalid_metadata", problem)


def build_items(
    found: list[tuple[str, Path]],
    manifest: Manifest | None,
    owned: bool,
    default_id: Callable[[str], str] = default_track_id,
) -> list[Item]:
    """(filename, path) pairs + manifest -> validated items, in the order found."""
    if not found:
        raise InvalidInput(
            "no_audio_files", f"the request holds no audio files ({' '.join(AUDIO_EXTENSIONS)})"
        )
    names = [f for f, _ in found]
    dup_names = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup_names:
        raise InvalidInput("duplicate_filename", f"files named twice: {listed(dup_names)}")
    manifest = manifest or {}
    missing = sorted(set(manifest) - set(names))
    if missing:
        raise InvalidInput(
            "manifest_files_missing",
            f"the manifest names files that were not sent: {listed(missing)}",
        )
    items = []
    bad_ids = []
    for filename, path in found:
        row = manifest.get(filename, {})
        track_id = row.get("track_id") or default_id(filename)
        if not valid_track_id(track_id):
            bad_ids.append(track_id)
        title = row.get("title") or PurePosixPath(filename.replace("\\", "/")).stem
        problem = metadata_problem({**row, "title": title})
        if problem:
            raise InvalidInput("invalid_metadata", f"{filename[:200]!r}: {problem}")
        items.append(
            Item(filename, path, owned, track_id, title, row.get("artist", ""), row.get("work_id"))
        )
    if bad_ids:
        raise invalid_track_ids(bad_ids)
    dup_ids = sorted(t for t, c in Counter(i.track_id for i in items).items() if c > 1)
    if dup_ids:
        raise InvalidInput(
            "duplicate_track_id", f"track ids used by more than one file: {listed(dup_ids)}"
        )
    return items


def resolve_under(root: Path | None, path: str, what: str = "path") -> Path:
    """A client-given path, relative to the import root or absolute, resolved (symlinks
    too) and required to stay inside the root; 403 otherwise."""
    if root is None:
        raise Forbidden(
            "path_ingest_disabled",
            "ingestion by path is disabled; set REFRAIN_IMPORT_ROOT to the folder "
            "under which catalogs may be read",
        )
    if "\x00" in path:  # no file name holds one; the OS would refuse it
        raise InvalidInput("invalid_path", f"{what} {path[:200]!r} contains a NUL character")
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise Forbidden("path_forbidden", f"{what} {path!r} is outside the import root")
    return target


def scan_folder(
    folder: Path, root: Path, max_files: int
) -> tuple[list[tuple[str, Path]], int, dict[str, bytes]]:
    """Audio files under `folder` (recursively, sorted) as (relative path, file), the count of
    other files, and the root manifests found. Links leading outside `root` are skipped."""
    if not folder.is_dir():
        raise InvalidInput("path_not_found", f"{folder} is not a folder")
    base = root.resolve()
    found: list[tuple[str, Path]] = []
    ignored = 0
    manifests = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            rel = file.relative_to(folder).as_posix()
            if file.is_symlink() and not file.resolve().is_relative_to(base):
                ignored += 1  # never read, manifests included: their text may be echoed
                continue
            if rel.lower() in MANIFEST_NAMES:
                manifests[rel.lower()] = read_manifest_file(file)
                continue
            if file.suffix.lower() not in AUDIO_EXTENSIONS or name.startswith("._"):
                ignored += 1
                continue
            found.append((rel, file))
            if len(found) > max_files:
                raise TooLarge(
                    "too_many_files", f"{folder} holds more than {max_files} audio files"
                )
    return found, ignored, manifests
