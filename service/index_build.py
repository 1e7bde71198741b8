"""`refrain index build`: embed a catalog offline into the index a service then opens.

Tracks are written as `Runtime.add_reference` writes them: the same model identity (with the
reference hop), the same audio checks, the SHA-256 of the file's bytes as content hash and
the decoded waveform's duration. So the service opens the index, and sending the same files
to it later finds them unchanged. A re-run skips tracks already stored with the same content,
so an interrupted build resumes where it stopped (every track written is durable).
"""

from __future__ import annotations

import argparse
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from index import IndexOptions, SegmentIndex, SegmentIndexError, open_index
from model.embedder import load_model
from service.errors import classify
from service.ingest_cli import Entry
from service.metrics import Metrics
from service.runtime import Runtime, reference_record
from service.settings import Settings


@dataclass
class _Prepared:
    entry: Entry
    digest: str = ""
    wave: np.ndarray | None = None  # None: skipped or failed
    skipped: bool = False
    error: tuple[str, str] | None = None  # (code, message)


def build_index(
    entries: list[Entry], args: argparse.Namespace
) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Embed and store `entries`; returns counts and (file, code, message) failures."""
    settings = Settings(data_dir=args.data)
    hop = args.hop or settings.reference_hop_s
    model = load_model(args.checkpoint, device=args.device)
    checker = Runtime(settings, Metrics())  # its audio checks, without a worker or an index
    checker.model = model
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        index = open_index(
            settings.index_dir, {**model.identity.to_dict(), "hop_s": hop},
            factory=args.factory or settings.index_factory,
            options=IndexOptions(vector_dtype=settings.vector_dtype,
                                 search_params=settings.index_search_params or None),
        )
    except SegmentIndexError as e:
        raise ValueError(f"cannot open the index in {settings.index_dir}: {e}") from e
    counts = {"added": 0, "replaced": 0, "skipped": 0}
    failures: list[tuple[str, str, str]] = []
    size = max(1, args.chunk)
    chunks = [entries[i : i + size] for i in range(0, len(entries), size)]

    def prepare(chunk: list[Entry]) -> list[_Prepared]:
        return [_prepare(e, index, checker, settings.max_reference_s, args.replace) for e in chunk]

    bar = tqdm(total=len(entries), unit="file", desc="index build", dynamic_ncols=True)
    with index, ThreadPoolExecutor(max_workers=1) as pool:  # decode the next chunk meanwhile
        ahead = pool.submit(prepare, chunks[0])
        for k in range(len(chunks)):
            ready = ahead.result()
            if k + 1 < len(chunks):
                ahead = pool.submit(prepare, chunks[k + 1])
            todo = [p for p in ready if p.wave is not None]
            zs = model.embed_many([p.wave for p in todo], hop=hop, batch_size=args.batch_size,
                                  errors="skip")
            _store(index, list(zip(todo, zs)), model.sample_rate, hop, args.replace, counts)
            for p in ready:
                if p.skipped:
                    counts["skipped"] += 1
                elif p.error is not None:
                    failures.append((p.entry.name, *p.error))
            bar.update(len(ready))
        if counts["added"] or counts["replaced"]:
            index.snapshot()  # the service then opens without replaying a long journal
    bar.close()
    return counts, failures


def _prepare(
    entry: Entry, index: SegmentIndex, checker: Runtime, max_s: float, replace: bool
) -> _Prepared:
    p = _Prepared(entry)
    try:
        data = entry.path.read_bytes()
        p.digest = hashlib.sha256(data).hexdigest()
        existing = index.get_track(entry.track_id)
        if existing is not None and existing.content_sha256 == p.digest:
            p.skipped = True
        elif existing is not None and not replace:
            p.error = ("track_exists", (f"track {entry.track_id!r} exists with other content; "
                                        "pass --replace to replace it"))
        else:
            p.wave = checker.decode(data, max_s, min_s=0.5)
    except Exception as e:  # noqa: BLE001 - any failure is this file's, reported by code
        err = classify(e)
        p.error = (err.code, err.message)
    return p


def _store(
    index: SegmentIndex, embedded: list[tuple[_Prepared, np.ndarray | None]], sample_rate: int,
    hop: float, replace: bool, counts: dict[str, int],
) -> None:
    """Add a chunk's embedded files in one durable batch (one fsync); when the batch fails,
    one by one, so that each failure is its own file's."""
    items, owners = [], []
    for p, z in embedded:
        if z is None:
            p.error = ("bad_audio", "the audio could not be embedded")
            continue
        e = p.entry
        meta = {"track_id": e.track_id, "title": e.title, "artist": e.artist,
                "work_id": e.work_id}
        record = reference_record(meta, len(p.wave), sample_rate, p.digest)
        items.append((record, z, np.arange(len(z), dtype=np.float64) * hop))
        owners.append(p)
        p.wave = None  # free the waveform
    try:
        results = index.add_tracks(items, replace=replace)
    except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
        results = []
        for p, item in zip(owners, items, strict=True):
            try:
                results.append(index.add_track(*item, replace=replace))
            except Exception as exc:  # noqa: BLE001 - reported for this file, the build goes on
                err = classify(exc)
                p.error = (err.code, err.message)
                results.append(None)
    for result in results:
        if result is not None:
            counts[result.value if result.value != "unchanged" else "skipped"] += 1
