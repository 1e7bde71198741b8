"""`refrain ingest`: upload a catalog to a running service; `refrain index build`: offline.

`ingest` sends the catalog in batches, each one multipart job (`POST /v1/ingest`) carrying
a generated manifest, keeps at most two jobs in flight, and follows them with a progress bar.
Connection errors and 503 are retried with exponential backoff (Retry-After is respected). A
state file records each batch's job, so a second run re-polls unfinished jobs and skips
batches whose jobs finished; a batch is keyed by its files' names, sizes, modification times
and metadata, so a changed file is sent again. A batch retried after a lost response may
become a second job: harmless, its items are then 'skipped' (ingestion is idempotent).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.cli import AUDIO_EXTENSIONS, find_audio

STATE_FILE = ".refrain-ingest-state.json"
CATALOG_FIELDS = ("path", "track_id", "title", "artist", "work_id")
IN_FLIGHT = 2  # jobs submitted and not finished: upload the next batch while one is processed
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Entry:
    """One file of a catalog."""

    path: Path
    name: str  # path relative to the catalog folder (or as the manifest wrote it), '/' separated
    track_id: str
    title: str = ""
    artist: str = ""
    work_id: str = ""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="upload a catalog (folder or manifest CSV) to a service")
    p.add_argument("source", metavar="DIR|MANIFEST",
                   help="folder of audio files, or CSV with columns path,track_id,title,"
                        "artist,work_id (paths relative to the CSV)")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="API key (default: $REFRAIN_API_KEY)")
    p.add_argument("--batch", type=int, default=50, help="files per job")
    p.add_argument("--batch-mb", type=float, default=100.0, help="megabytes per job at most")
    p.add_argument("--retries", type=int, default=5, help="retries on connection errors and 503")
    p.add_argument("--state", default=None,
                   help=f"resumption state file (default: {STATE_FILE} beside the catalog)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between job polls")
    p.add_argument("--replace", action="store_true",
                   help="replace tracks stored with other content instead of failing them")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("index", help="offline index operations (no service needed)")
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="embed a catalog into an index the service can open")
    b.add_argument("source", metavar="DIR|MANIFEST", help="as for `refrain ingest`")
    b.add_argument("--data", required=True, help="the service's data folder (index in data/index)")
    b.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    b.add_argument("--factory", default=None,
                   help="FAISS factory of a new index (default: REFRAIN_INDEX_FACTORY or Flat)")
    b.add_argument("--hop", type=float, default=None,
                   help="seconds between reference segments (default: REFRAIN_REFERENCE_HOP_S, 5)")
    b.add_argument("--chunk", type=int, default=16, help="files decoded and embedded together")
    b.add_argument("--batch-size", type=int, default=32, help="segments per network call")
    b.add_argument("--device", default=None, help="cpu (default) or cuda")
    b.add_argument("--replace", action="store_true", help="replace tracks with other content")
    b.set_defaults(func=cmd_index_build)


# -- catalogs -------------------------------------------------------------------------------------


def read_catalog(source: Path) -> list[Entry]:
    """A folder (audio files, recursively) or a manifest CSV -> entries, validated."""
    from service.sources import default_track_id

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
    from service.sources import default_track_id

    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "path" not in fields or set(fields) - set(CATALOG_FIELDS):
            raise ValueError(
                f"{manifest}: expected a CSV header of {','.join(CATALOG_FIELDS)} "
                f"(only path is required), got {','.join(fields)}"
            )
        reader.fieldnames = fields
        entries = []
        for n, row in enumerate(reader, 2):
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get("path"):
                raise ValueError(f"{manifest} line {n}: no path")
            rel = row["path"].replace("\\", "/")
            path = manifest.parent / rel
            if not path.is_file():
                raise FileNotFoundError(f"{manifest} line {n}: no such file {path}")
            entries.append(Entry(
                path, rel, row.get("track_id") or default_track_id(rel),
                row.get("title") or Path(rel).stem, row.get("artist", ""), row.get("work_id", ""),
            ))
    return entries


def _check_entries(entries: list[Entry], source: Path) -> None:
    from service.sources import valid_track_id

    bad = [e.track_id for e in entries if not valid_track_id(e.track_id)]
    if bad:
        raise ValueError(f"{source}: invalid track ids {bad[:10]} (letters, digits, spaces, "
                         "._-:@+()' and '/' between parts, at most 200 characters)")
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
        h.update(json.dumps([e.name, e.track_id, e.title, e.artist, e.work_id, st.st_size,
                             st.st_mtime_ns]).encode())
    return h.hexdigest()[:32]


def manifest_csv(batch: list[Entry]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("filename", "track_id", "title", "artist", "work_id"))
    for e in batch:
        w.writerow((e.name, e.track_id, e.title, e.artist, e.work_id))
    return buf.getvalue().encode()


# -- refrain ingest -------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from service.ingest_client import Uploader

    source = Path(args.source)
    entries = read_catalog(source)
    state_path = Path(args.state) if args.state else (
        (source if source.is_dir() else source.parent) / STATE_FILE
    )
    key = args.api_key or os.environ.get("REFRAIN_API_KEY") or None
    work = batches(entries, max(1, args.batch), args.batch_mb * 1e6)
    with Uploader(args.url.rstrip("/"), key, state_path, args.retries, args.poll,
                  args.replace) as up:
        summary = up.run(work, total=len(entries))
    print(summary.render(), file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0


# -- refrain index build --------------------------------------------------------------------------


def cmd_index_build(args: argparse.Namespace) -> int:
    from service.index_build import build_index

    entries = read_catalog(Path(args.source))
    t0 = time.perf_counter()
    counts, failures = build_index(entries, args)
    print(f"index build: added {counts['added']}, replaced {counts['replaced']}, "
          f"skipped {counts['skipped']} (already present), failed {len(failures)} "
          f"in {time.perf_counter() - t0:.1f} s")
    for name, code, message in failures:
        print(f"  failed {name}: {code}: {message}", file=sys.stderr)
    return 1 if failures else 0


def open_files(stack: ExitStack, batch: list[Entry]) -> list[tuple[str, Any]]:
    """Multipart parts of one batch: the files and the generated manifest."""
    parts: list[tuple[str, Any]] = [
        ("files", (e.name, stack.enter_context(e.path.open("rb")), "application/octet-stream"))
        for e in batch
    ]
    parts.append(("manifest", ("manifest.csv", manifest_csv(batch), "text/csv")))
    return parts
