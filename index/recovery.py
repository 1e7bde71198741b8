"""Opening an index directory: from the snapshot and journal back to the state before a crash.

`recover` loads the snapshot, replays the journal records it does not cover (after cutting a
torn tail), rebuilds what is derived when it is missing or inconsistent (the ANN index from the
exact vectors, the SQLite catalog from the snapshot's track list and the journal), and catches
the catalog up with records it had not reached. See `index.store` for the write protocol this
relies on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import AnnIndex
from .catalog import Catalog
from .files import BACKUP_HINT, CATALOG_FILE, JOURNAL_FILE, MANIFEST_FILE, SNAPSHOT_DIR
from .journal import Journal, Op, Record
from .snapshot import (
    Manifest,
    collect_garbage,
    damaged_files,
    iter_tracks,
    load_ann,
    load_store,
    read_manifest,
)
from .types import CorruptIndexError, IndexOptions
from .vectors import VectorStore

log = logging.getLogger(__name__)


@dataclass
class State:
    """Everything an open index holds, consistent as of `seq`."""

    store: VectorStore
    ann: AnnIndex
    manifest: Manifest
    journal: Journal
    catalog: Catalog
    seq: int


def new_ann(zdim: int, factory: str, options: IndexOptions) -> AnnIndex:
    return AnnIndex(zdim, factory, options.search_params, options.use_gpu)


def apply_record(store: VectorStore, ann: AnnIndex, record: Record) -> None:
    """Apply one durable journal record to memory (exact vectors and ANN index)."""
    if record.op in (Op.REPLACE, Op.DELETE):
        slot = store.remove(record.track_id)
        if slot is not None:
            ann.remove_range(slot.first_id, slot.n)
    if record.op in (Op.ADD, Op.REPLACE):
        if record.track_id in store.slots:
            raise CorruptIndexError(
                f"journal seq {record.seq} adds track {record.track_id!r}, which already exists"
            )
        assert record.vectors is not None and record.starts is not None
        slot = store.add(
            record.track_id,
            record.first_segment_id,
            record.vectors,
            record.starts,
            record.meta.get("content_sha256"),
        )
        ann.add(record.vectors, slot.ids)


def _load_ann(
    path: Path, manifest: Manifest, store: VectorStore, factory: str, options: IndexOptions
) -> AnnIndex:
    snapdir = path / SNAPSHOT_DIR
    try:
        if manifest.ann and manifest.ann in damaged_files(snapdir, _only(manifest, manifest.ann)):
            raise ValueError(f"{manifest.ann} does not match its checksum")
        ann = load_ann(
            snapdir, manifest, store.zdim, factory, options.search_params, options.use_gpu
        )
    except (RuntimeError, ValueError, OSError) as e:  # derived: rebuilt from the exact copies
        log.warning("%s: the ANN index cannot be read (%s); rebuilding it", path, e)
        ann = None
    if ann is not None and ann.ntotal != store.n_segments + len(ann.tombstones):
        log.warning(
            "%s: ANN index holds %d vectors for %d segments; rebuilding it",
            path,
            ann.ntotal,
            store.n_segments,
        )
        ann = None
    if ann is None:  # a flat scan is not persisted; anything else is rebuilt from exact copies
        ann = new_ann(store.zdim, factory, options)
        for ids, vectors in store.batches():
            ann.add(vectors, ids)
    return ann


def _only(manifest: Manifest, name: str) -> Manifest:
    """The manifest restricted to one file's checksum."""
    return Manifest(checksums={k: v for k, v in manifest.checksums.items() if k == name})


def _check_snapshot(snapdir: Path, manifest: Manifest) -> None:
    """CorruptIndexError if a snapshot file the index cannot rebuild (chunks, track list,
    tombstones) differs from its checksum; a damaged ANN file is rebuilt instead."""
    damaged = [n for n in damaged_files(snapdir, manifest) if n != manifest.ann]
    if damaged:
        raise CorruptIndexError(
            f"{snapdir}: {', '.join(damaged)} no longer match the checksums in "
            f"{MANIFEST_FILE}: the snapshot is damaged; {BACKUP_HINT}"
        )


def rebuild_catalog(
    path: Path, catalog: Catalog, manifest: Manifest, records: list[Record], why: str
) -> None:
    log.warning("%s: rebuilding the catalog from the snapshot and journal (%s)", path, why)
    rows = (
        (line["track"], line["first_segment_id"])
        for line in iter_tracks(path / SNAPSHOT_DIR, manifest)
    )
    catalog.rebuild(rows, manifest.seq)
    for record in records:
        catalog.apply(record)


def _unexplained_snapshot_files(snapdir: Path) -> list[str]:
    """Snapshot files (not temporaries) in a snapshot folder that has no manifest."""
    if (snapdir / MANIFEST_FILE).exists() or not snapdir.is_dir():
        return []
    return sorted(p.name for p in snapdir.iterdir() if not p.name.endswith(".tmp"))


def _check_orphans(snapdir: Path, orphans: list[str], records: list[Record]) -> None:
    """Without a manifest, snapshot files are leftovers only if the journal holds the whole
    history (it starts at seq 1: no snapshot ever truncated it). Otherwise the manifest was
    lost, and those files hold acknowledged writes that exist nowhere else."""
    if not orphans or (records and records[0].seq == 1):
        return
    journal = f"starts at seq {records[0].seq}" if records else "is empty"
    listed = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    raise CorruptIndexError(
        f"{snapdir / MANIFEST_FILE} is missing, but {snapdir} holds {len(orphans)} snapshot "
        f"files ({listed}) and the journal {journal}, so they may hold the only copy of "
        f"acknowledged writes; {BACKUP_HINT}"
    )


def recover(path: Path, zdim: int, factory: str, dtype: np.dtype, options: IndexOptions) -> State:
    snapdir = path / SNAPSHOT_DIR
    orphans = _unexplained_snapshot_files(snapdir)
    manifest = read_manifest(snapdir)
    _check_snapshot(snapdir, manifest)
    store = VectorStore(zdim, dtype)
    load_store(snapdir, manifest, store)
    ann = _load_ann(path, manifest, store, factory, options)

    journal_existed = (path / JOURNAL_FILE).exists()
    journal = Journal(path / JOURNAL_FILE, zdim)
    catalog = None
    try:
        records = [r for r in journal.replay() if r.seq > manifest.seq]
        _check_orphans(snapdir, orphans, records)
        if records and records[0].seq != manifest.seq + 1:
            raise CorruptIndexError(
                f"{journal.path} starts at seq {records[0].seq}, "
                f"the snapshot covers up to {manifest.seq}"
            )
        collect_garbage(snapdir, manifest)  # only now: recovery has proven them superseded
        if journal.n_records and not records:
            journal.reset()  # all covered by the snapshot: a crash came before truncation
        seq = records[-1].seq if records else manifest.seq
        for record in records:
            apply_record(store, ann, record)

        catalog, reset = Catalog.open_or_reset(path / CATALOG_FILE)
        applied = catalog.applied_seq()
        if not reset and applied > seq:
            # every write reaches the catalog only after its journal record is durable (a torn
            # append never does), so a catalog ahead of snapshot + journal means durable
            # records were lost: the journal deleted, emptied or cut short
            state = "is missing" if not journal_existed else f"ends at seq {seq}"
            if not journal_existed:
                journal.close()
                (path / JOURNAL_FILE).unlink(missing_ok=True)
            raise CorruptIndexError(
                f"{path / JOURNAL_FILE} {state}, but {path / CATALOG_FILE} has applied writes up "
                f"to seq {applied} (the snapshot covers up to {manifest.seq}): acknowledged "
                f"writes were lost with the journal; nothing was changed. {BACKUP_HINT}"
            )
        if reset or not manifest.seq <= applied <= seq:
            rebuild_catalog(path, catalog, manifest, records, "it is missing or out of step")
        else:
            for record in records:
                catalog.apply(record)  # skips those already applied
        if catalog.count() != len(store):
            rebuild_catalog(path, catalog, manifest, records, "its track count differs")
    except BaseException:
        journal.close()
        if catalog is not None:
            catalog.close()
        raise
    return State(store, ann, manifest, journal, catalog, seq)
