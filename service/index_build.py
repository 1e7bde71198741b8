"""`refrain index build`: embed a catalog offline into the index a service then opens.

Tracks pass the engine's own checks (`Engine.check_reference`: idempotent on track id and
content, the audio rules) and are stored as `Engine.record` describes them, in the store that
`open_store` opens for the service's settings (FAISS or Milvus), under the same model identity
with the reference hop. So the service opens the index, and sending the same files to it
later finds them unchanged. A re-run skips tracks already stored with the same content, so an
interrupted build resumes where it stopped (every track written is durable).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from refrain.index import AddResult, SegmentIndexError
from refrain.model.embedder import load_model
from refrain.service.backend import open_store
from refrain.service.catalog_files import Entry
from refrain.service.engine import CheckedReference, Engine, TrackMeta
from refrain.service.errors import as_domain_error
from refrain.service.metrics import Metrics
from refrain.service.settings import Settings


@dataclass(frozen=True)
class BuildOptions:
    data: Path  # the service's data folder; the index goes in data/index
    checkpoint: str | None = None  # None: the shipped model
    factory: str | None = None  # FAISS factory of a new index (None: the settings')
    hop_s: float | None = None  # seconds between reference segments (None: the settings')
    chunk: int = 16  # files decoded and embedded together
    batch_size: int = 32  # segments per network call
    device: str | None = None
    replace: bool = False  # replace tracks stored with other content


@dataclass
class _Prepared:
    entry: Entry
    checked: CheckedReference | None = None  # None: failed
    error: tuple[str, str] | None = None  # (code, message)

    @property
    def meta(self) -> TrackMeta:
        e = self.entry
        return TrackMeta(e.track_id, e.title, e.artist, e.work_id or None)


def build_index(
    entries: list[Entry], options: BuildOptions
) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Embed and store `entries`; returns counts and (file, code, message) failures."""
    settings = Settings(data_dir=options.data)
    if options.hop_s:
        settings = settings.model_copy(update={"reference_hop_s": options.hop_s})
    hop = settings.reference_hop_s
    model = load_model(options.checkpoint, device=options.device)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = open_store(
            settings, {**model.identity.to_dict(), "hop_s": hop}, factory=options.factory
        )
    except SegmentIndexError as e:
        raise ValueError(f"cannot open the index in {settings.index_dir}: {e}") from e
    engine = Engine(settings, model, store, None, Metrics())  # checks only; embedding is here
    counts = {"added": 0, "replaced": 0, "skipped": 0}
    failures: list[tuple[str, str, str]] = []
    size = max(1, options.chunk)
    chunks = [entries[i : i + size] for i in range(0, len(entries), size)]

    def prepare(chunk: list[Entry]) -> list[_Prepared]:
        return [_prepare(e, engine, options.replace) for e in chunk]

    bar = tqdm(total=len(entries), unit="file", desc="index build", dynamic_ncols=True)
    with store, ThreadPoolExecutor(max_workers=1) as pool:  # decode the next chunk meanwhile
        ahead = pool.submit(prepare, chunks[0])
        for k in range(len(chunks)):
            ready = ahead.result()
            if k + 1 < len(chunks):
                ahead = pool.submit(prepare, chunks[k + 1])
            todo, waves = [], []
            for p in ready:
                if p.checked is not None and p.checked.wave is not None:
                    todo.append(p)
                    waves.append(p.checked.wave)
            zs = model.embed_many(
                waves,
                hop=hop,
                batch_size=options.batch_size,
                errors="skip",
            )
            _store(engine, list(zip(todo, zs, strict=True)), hop, options.replace, counts)
            for p in ready:
                if p.checked is not None and p.checked.unchanged is not None:
                    counts["skipped"] += 1
                elif p.error is not None:
                    failures.append((p.entry.name, *p.error))
            bar.update(len(ready))
        if counts["added"] or counts["replaced"]:
            store.snapshot()  # the service then opens without replaying a long journal
    bar.close()
    return counts, failures


def _prepare(entry: Entry, engine: Engine, replace: bool) -> _Prepared:
    p = _Prepared(entry)
    try:
        p.checked = engine.check_reference(entry.path.read_bytes(), entry.track_id, replace)
    except Exception as e:  # noqa: BLE001 - any failure is this file's, reported by code
        err = as_domain_error(e)
        if err.code == "track_exists":
            err.message = (
                f"track {entry.track_id!r} exists with other content; pass --replace to replace it"
            )
        p.error = (err.code, err.message)
    return p


def _store(
    engine: Engine,
    embedded: list[tuple[_Prepared, np.ndarray | None]],
    hop: float,
    replace: bool,
    counts: dict[str, int],
) -> None:
    """Add a chunk's embedded files in one durable batch (one fsync); when the batch fails,
    one by one, so that each failure is its own file's."""
    items, owners = [], []
    for p, z in embedded:
        assert p.checked is not None
        if z is None:
            p.error = ("bad_audio", "the audio could not be embedded")
            continue
        record = engine.record(p.meta, p.checked)
        items.append((record, z, np.arange(len(z), dtype=np.float64) * hop))
        owners.append(p)
        p.checked.wave = None  # free the waveform
    results: list[AddResult | None]
    try:
        results = list(engine.store.add_tracks(items, replace=replace))
    except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
        results = []
        for p, item in zip(owners, items, strict=True):
            try:
                results.append(engine.store.add_track(*item, replace=replace))
            except Exception as exc:  # noqa: BLE001 - reported for this file, the build goes on
                err = as_domain_error(exc)
                p.error = (err.code, err.message)
                results.append(None)
    for result in results:
        if result is not None:
            counts[result.value if result.value != "unchanged" else "skipped"] += 1
