"""A catalog on disk, as `refrain ingest` and `refrain index build` read it: a folder of audio
files (recursively; track id and title from the path) or a manifest (`manifests`: CSV with
the columns filename,track_id,title,artist,work_id, `path` accepted for `filename`, or the
same as JSON) whose file names are paths relative to the manifest. Entries are validated
(track ids, duplicates) before anything is sent or embedded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refrain.model.audio import AUDIO_EXTENSIONS, find_audio
from refrain.service.errors import InvalidInput
from refrain.service.manifests import MANIFEST_FIELDS, parse_manifest
from refrain.service.track_ids import default_track_id, invalid_track_ids, valid_track_id


@dataclass(frozen=True)
class Entry:
    """One file of a catalog."""

    path: Path
    name: str  # path relative to the catalog folder (or as the manifest wrote it), '/' separated
    track_id: str
    title: str = ""
    artist: str = ""
    work_id: str = ""


def read_catalog(source: Path) -> list[Entry]:
    """A folder (audio files, recursively) or a manifest -> entries, validated."""
    if source.is_dir():
        entries = [
            Entry(f, rel.as_posix(), default_track_id(rel.as_posix()), rel.stem)
            for f, rel in find_audio([str(source)])
        ]
    elif source.is_file():
        entries = _read_manifest(source)
    else:
        raise FileNotFoundError(f"no such folder or manifest: {source}")
    if not entries:
        raise ValueError(f"no audio files ({' '.join(AUDIO_EXTENSIONS)}) in {source}")
    _check_entries(entries, source)
    return entries


def _read_manifest(manifest: Path) -> list[Entry]:
    try:
        rows = parse_manifest(manifest.read_bytes(), str(manifest))
    except InvalidInput as e:
        raise ValueError(e.message) from None
    entries = []
    for n, (filename, row) in enumerate(rows.items(), 1):
        rel = filename.replace("\\", "/")
        path = manifest.parent / rel
        if not path.is_file():
            raise FileNotFoundError(f"{manifest} row {n}: no such file {path}")
        entries.append(
            Entry(
                path,
                rel,
                row.get("track_id") or default_track_id(rel),
                row.get("title") or Path(rel).stem,
                row.get("artist", ""),
                row.get("work_id", ""),
            )
        )
    return entries


def _check_entries(entries: list[Entry], source: Path) -> None:
    bad = [e.track_id for e in entries if not valid_track_id(e.track_id)]
    if bad:
        raise ValueError(f"{source}: {invalid_track_ids(bad).message}")
    seen: dict[str, str] = {}
    for key, what in ((lambda e: e.track_id, "track id"), (lambda e: e.name, "file")):
        seen.clear()
        dup = sorted({key(e) for e in entries if seen.setdefault(key(e), e.name) != e.name})
        if dup:
            raise ValueError(f"{source}: {what}s used more than once: {dup[:10]}")


def batches(entries: list[Entry], max_files: int, max_bytes: float) -> list[list[Entry]]:
    out: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = e.path.stat().st_size
        if out[-1] and (len(out[-1]) >= max_files or size + n > max_bytes):
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out


def batch_key(batch: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in batch:
        st = e.path.stat()
        h.update(
            json.dumps(
                [e.name, e.track_id, e.title, e.artist, e.work_id, st.st_size, st.st_mtime_ns]
            ).encode()
        )
    return h.hexdigest()[:32]


def manifest_csv(batch: list[Entry]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_FIELDS)
    for e in batch:
        w.writerow((e.name, e.track_id, e.title, e.artist, e.work_id))
    return buf.getvalue().encode()


def open_files(stack: ExitStack, batch: list[Entry]) -> list[tuple[str, Any]]:
    """Multipart parts of one batch: the files and the generated manifest."""
    parts: list[tuple[str, Any]] = [
        ("files", (e.name, stack.enter_context(e.path.open("rb")), "application/octet-stream"))
        for e in batch
    ]
    parts.append(("manifest", ("manifest.csv", manifest_csv(batch), "text/csv")))
    return parts
