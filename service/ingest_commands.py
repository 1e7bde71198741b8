"""`refrain ingest`: upload a catalog to a running service; `refrain index build` and
`refrain index snapshot`: offline.

`ingest` sends the catalog in batches, each one multipart job (`POST /v1/ingest`) carrying
a generated manifest, keeps at most two jobs in flight, and follows them with a progress bar.
Connection errors and 503 are retried with exponential backoff (Retry-After is respected). A
state file records each batch's job, so a second run re-polls unfinished jobs and skips
batches whose jobs finished; a batch is keyed by its files' names, sizes, modification times
and metadata, so a changed file is sent again. A batch retried after a lost response may
become a second job: harmless, its items are then 'skipped' (ingestion is idempotent). The
state file is the user's, never the catalog's: one per catalog under the XDG state folder
(`ingest_client.default_state_path`).

Everything heavier than argparse is imported inside the commands, so that `-h` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="upload a catalog (folder or manifest CSV) to a service")
    p.add_argument(
        "source",
        metavar="DIR|MANIFEST",
        help="folder of audio files, or manifest CSV with columns filename,track_id,title,"
        "artist,work_id (filename: a path relative to the CSV; path is accepted for it)",
    )
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="API key (default: $REFRAIN_API_KEY)")
    p.add_argument("--batch", type=int, default=50, help="files per job")
    p.add_argument("--batch-mb", type=float, default=100.0, help="megabytes per job at most")
    p.add_argument("--retries", type=int, default=5, help="retries on connection errors and 503")
    p.add_argument(
        "--state",
        default=None,
        help="resumption state file (default: one per catalog in $XDG_STATE_HOME/refrain/ingest, "
        "~/.local/state/refrain/ingest when unset; a state file an older version left in the "
        "catalog folder is moved there)",
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between job polls")
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace tracks stored with other content instead of failing them",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("index", help="offline index operations (no service needed)")
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="embed a catalog into an index the service can open")
    b.add_argument("source", metavar="DIR|MANIFEST", help="as for `refrain ingest`")
    b.add_argument("--data", required=True, help="the service's data folder (index in data/index)")
    b.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    b.add_argument(
        "--factory",
        default=None,
        help="FAISS factory of a new index (default: REFRAIN_INDEX_FACTORY or Flat)",
    )
    b.add_argument(
        "--hop",
        type=float,
        default=None,
        help="seconds between reference segments (default: REFRAIN_REFERENCE_HOP_S, 5)",
    )
    b.add_argument("--chunk", type=int, default=16, help="files decoded and embedded together")
    b.add_argument("--batch-size", type=int, default=32, help="segments per network call")
    b.add_argument("--device", default=None, help="cpu (default) or cuda")
    b.add_argument("--replace", action="store_true", help="replace tracks with other content")
    b.set_defaults(func=cmd_index_build)
    s = actions.add_parser(
        "snapshot",
        help="write a snapshot now and truncate the journal (the service must be stopped)",
    )
    s.add_argument("--data", required=True, help="the service's data folder (index in data/index)")
    s.set_defaults(func=cmd_index_snapshot)


# -- refrain ingest -------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from refrain.service.catalog_files import batches, read_catalog
    from refrain.service.ingest_client import Uploader, adopt_legacy_state, default_state_path

    source = Path(args.source)
    entries = read_catalog(source)
    state_path = Path(args.state) if args.state else default_state_path(source)
    if adopt_legacy_state(source, state_path):
        print(f"ingest: resumption state moved to {state_path}", file=sys.stderr)
    key = args.api_key or os.environ.get("REFRAIN_API_KEY") or None
    work = batches(entries, max(1, args.batch), args.batch_mb * 1e6)
    with Uploader(
        args.url.rstrip("/"), key, state_path, args.retries, args.poll, args.replace
    ) as up:
        summary = up.run(work, total=len(entries))
    print(summary.render(), file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0


# -- refrain index build --------------------------------------------------------------------------


def cmd_index_build(args: argparse.Namespace) -> int:
    from refrain.service.catalog_files import read_catalog
    from refrain.service.index_build import BuildOptions, build_index

    entries = read_catalog(Path(args.source))
    options = BuildOptions(
        data=Path(args.data),
        checkpoint=args.checkpoint,
        factory=args.factory,
        hop_s=args.hop,
        chunk=args.chunk,
        batch_size=args.batch_size,
        device=args.device,
        replace=args.replace,
    )
    t0 = time.perf_counter()
    counts, failures = build_index(entries, options)
    print(
        f"index build: added {counts['added']}, replaced {counts['replaced']}, "
        f"skipped {counts['skipped']} (already present), failed {len(failures)} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    for name, code, message in failures:
        print(f"  failed {name}: {code}: {message}", file=sys.stderr)
    return 1 if failures else 0


# -- refrain index snapshot -----------------------------------------------------------------------


def cmd_index_snapshot(args: argparse.Namespace) -> int:
    from refrain.index import SegmentIndexError
    from refrain.service.backend import open_store, stored_index_info
    from refrain.service.settings import Settings

    settings = Settings(data_dir=Path(args.data))
    try:
        info = stored_index_info(settings.index_dir)
        store = open_store(settings, info["identity"], factory=info.get("factory"))
    except (SegmentIndexError, ValueError) as e:
        print(f"refrain index snapshot: {e}", file=sys.stderr)
        return 1
    with store:
        print(f"snapshot: writing {settings.index_dir}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        store.snapshot()
        seconds = time.perf_counter() - t0
        print(f"snapshot: {len(store)} tracks written in {seconds:.2f} s")
    return 0
