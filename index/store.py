"""`SegmentIndex`: the persistent, crash-safe store of reference segments.

Source of truth: the latest snapshot plus the journal. Everything else is derived from them.

- A write (add, replace, delete) becomes one journal record with the next sequence number
  (`seq`) and is fsynced before anything else happens; a replace is one record, so it is
  atomic. Only then is it applied to memory (exact vectors, ANN index) and to the SQLite
  catalog, whose transaction also stores `applied_seq`. The method returns after all three.
- A crash before the fsync completes leaves at most a torn tail record, which the next open
  detects (length, CRC) and truncates: the write never happened and was never acknowledged.
  A crash after it is repaired at open: the record is replayed into memory, and into the
  catalog if `seq > applied_seq` (the catalog never runs ahead of the durable journal).
- A snapshot writes new files under fresh names, fsyncs them, then atomically replaces
  `snapshot/MANIFEST.json`, which records the `seq` it covers, and only then truncates the
  journal. Replay skips records with `seq <=` that value, so a crash between the manifest and
  the truncation applies nothing twice.
- The catalog is rebuilt from the snapshot's track list and the journal when it is missing,
  unreadable, behind the snapshot, ahead of the journal or disagrees with the vector store.
  A catalog write that fails after its journal record is durable leaves the catalog behind,
  refusing reads, until it catches up from the journal by itself (`index.catalog_upkeep`).
- Snapshots happen on `snapshot()`, after `snapshot_every_records` records or
  `snapshot_every_bytes` journal bytes, and once an untrained IVF/PQ index has enough vectors.

Concurrency: an exclusive `flock` keeps other processes out; inside the process a mutex
serialises writers and snapshots, and a readers-writer lock lets searches run concurrently with
each other and with the slow parts of a write (the fsync) or of a snapshot (file writing,
training), excluding them only while memory is being changed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backends import make_factory_index
from .catalog_upkeep import CatalogUpkeep
from .files import (
    INDEX_FILE,
    SNAPSHOT_DIR,
    WriterLock,
    check_identity,
    check_new_index_dir,
    create_index_file,
    dir_size,
    make_index_dir,
    read_index_file,
    validate_identity,
)
from .journal import Op, Record
from .recovery import apply_record, recover
from .rwlock import RWLock
from .segment_store import write_decision
from .snapshot import collect_garbage, load_chunk, write_snapshot
from .types import (
    AddResult,
    IndexClosedError,
    IndexOptions,
    IndexStats,
    InsufficientStorageError,
    SegmentIndexError,
    TrackRecord,
)
from .validate import check_segments, check_track
from .vectors import Slot

log = logging.getLogger(__name__)

VECTOR_DTYPES = ("float32", "float16")


def open_index(
    path: str | Path,
    identity: dict[str, Any],
    factory: str | None = None,
    create: bool = True,
    options: IndexOptions | None = None,
) -> SegmentIndex:
    """Open (or create) the index at `path` for reading and writing.

    `identity` describes the embedding model (it must hold `zdim`); an index built by another
    model raises `IdentityMismatchError`. `factory` is a FAISS factory string ("Flat",
    "IVF1024,Flat", "HNSW32", "IVF1024,PQ16", ...), fixed at creation: None means "Flat" for a
    new index and the stored one otherwise. Only one process may have an index open.
    """
    options = options or IndexOptions()
    identity = validate_identity(identity)
    path = Path(path)
    if not (path / INDEX_FILE).exists():
        check_new_index_dir(path, create)
        if (options.vector_dtype or "float32") not in VECTOR_DTYPES:
            raise ValueError(
                f"vector_dtype must be one of {VECTOR_DTYPES}, got {options.vector_dtype!r}"
            )
        make_factory_index(identity["zdim"], factory or "Flat")  # raises if invalid
        make_index_dir(path)
    lock = WriterLock(path)
    try:
        if (path / INDEX_FILE).exists():
            info = read_index_file(path)
            check_identity(path, info["identity"], identity)
            for name, wanted in (("factory", factory), ("vector_dtype", options.vector_dtype)):
                if wanted is not None and wanted != info[name]:
                    raise ValueError(
                        f"index at {path} was created with {name}={info[name]!r}, "
                        f"got {wanted!r}; pass None to use the stored value"
                    )
        else:
            info = create_index_file(
                path, identity, factory or "Flat", options.vector_dtype or "float32"
            )
        return SegmentIndex(path, info, options, lock)
    except BaseException:
        lock.release()
        raise


class SegmentIndex(CatalogUpkeep):
    """Reference segments with their tracks; see the module docstring. Use `open_index`."""

    def __init__(
        self, path: Path, info: dict[str, Any], options: IndexOptions, lock: WriterLock
    ) -> None:
        self.path = path
        self.identity: dict[str, Any] = info["identity"]
        self.zdim: int = info["zdim"]
        self.factory: str = info["factory"]
        self.options = options
        self._lock = lock
        self._rw = RWLock()
        self._writer = threading.Lock()
        self._closed = False
        self._failed: str | None = None
        self._snapdir = path / SNAPSHOT_DIR
        state = recover(path, self.zdim, self.factory, np.dtype(info["vector_dtype"]), options)
        self._store = state.store
        self._ann = state.ann
        self._manifest = state.manifest
        self._journal = state.journal
        self._keep_catalog(state.catalog)
        self._seq = state.seq

    # -- writes ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise IndexClosedError(f"index at {self.path} is closed")
        if self._failed:
            raise IndexClosedError(
                f"index at {self.path} refuses writes after a failure "
                f"({self._failed}); reopen it to recover"
            )

    def _commit(self, records: list[Record]) -> None:
        try:
            self._journal.append_many(records)
        except OSError as e:
            # the journal cut the failed append off again: nothing was written, and the next
            # write may succeed (once space is freed); unless even that cut failed
            if self._journal.damaged:
                self._failed = f"journal write failed and could not be undone: {e}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorageError(
                    f"the disk holding {self._journal.path} is full ({e}); nothing was "
                    "written: free some space and write again"
                ) from e
            raise SegmentIndexError(
                f"could not write {self._journal.path} ({e}); nothing was written"
            ) from e
        self._seq = records[-1].seq
        with self._rw.write():
            try:
                for record in records:
                    apply_record(self._store, self._ann, record)
            except Exception as e:  # memory may now lag the journal
                self._failed = f"applying journal seq {records[0].seq}.. failed: {e}"
                raise SegmentIndexError(
                    f"the write of {[r.track_id for r in records][:5]} is durable in the "
                    f"journal but applying it failed ({e}); reopen the index to complete it"
                ) from e
            self._apply_to_catalog(records)
        self._catch_up_after_write()  # acknowledged even if the catalog still lags

    @property
    def failure(self) -> str | None:
        """Why the index cannot serve every request now (None: it can): writes refused after
        a failure that needs a reopen, or a catalog still behind the journal."""
        if self._closed:
            return "closed"
        if self._failed:
            return f"writes refused until reopened: {self._failed}"
        return self._catalog_failure()

    def _write_tracks(
        self,
        items: list[tuple[TrackRecord, np.ndarray, np.ndarray]],
        replace: bool,
        must_exist: bool,
    ) -> list[AddResult]:
        checked = []
        for track, vectors, starts_s in items:
            check_track(track)
            checked.append(
                (track, *check_segments(vectors, starts_s, self.zdim, self._store.dtype))
            )
        with self._writer:
            self._check_writable()
            results, records = [], []
            seq, segment_id = self._seq, self._store.next_segment_id
            now = time.time()
            for track, stored, starts in checked:
                decision = write_decision(
                    track, self._store.get(track.track_id), replace, must_exist
                )
                results.append(decision)
                if decision is AddResult.UNCHANGED:
                    continue
                op = Op.REPLACE if decision is AddResult.REPLACED else Op.ADD
                meta = dataclasses.replace(track, n_segments=len(starts), added_at=now)
                seq += 1
                records.append(
                    Record(seq, op, track.track_id, meta.to_stored(), segment_id, starts, stored)
                )
                segment_id += len(starts)
            if records:
                self._commit(records)
                self._auto_snapshot()
        return results

    def delete_track(self, track_id: str) -> bool:
        """Remove a track and its segments; False if there was none. Durable on return."""
        with self._writer:
            self._check_writable()
            if track_id not in self._store.slots:
                return False
            self._commit([Record(self._seq + 1, Op.DELETE, track_id, {"track_id": track_id})])
            self._auto_snapshot()
        return True

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Write a snapshot now (compacting if worthwhile) and truncate the journal."""
        with self._writer:
            self._check_writable()
            self._snapshot()

    def _auto_snapshot(self) -> None:
        o = self.options
        due = (
            self._journal.n_records >= o.snapshot_every_records
            or self._journal.size_bytes >= o.snapshot_every_bytes
            or (not self._ann.trained and self._store.n_segments >= self._ann.min_train)
        )
        if not due:
            return
        try:
            self._snapshot()
        except Exception:  # the write itself is durable; the next write tries again
            log.exception("%s: automatic snapshot failed", self.path)

    def _snapshot(self) -> None:
        store, ann = self._store, self._ann
        compact = (
            store.chunk_dead_fraction() > self.options.compact_dead_fraction
            or len(store.chunks) > 32
        )
        rebuild = ann.wants_rebuild(store.n_segments, self.options.compact_dead_fraction)
        if self._seq == self._manifest.seq and not compact and not rebuild:
            return
        if rebuild:  # searches go on meanwhile: writers are excluded, so the store is stable
            ann = ann.rebuild(
                store.batches, lambda n: store.sample(n, self.options.train_seed), store.n_segments
            )
        rows = self._catalog_rows()
        manifest, moved = write_snapshot(
            self._snapdir, self._manifest, self._seq, store, rows, ann, compact
        )
        # committed: swap in what was built, then drop what the manifest no longer names
        chunk = None
        if moved:
            chunk = load_chunk(self._snapdir, manifest.generation, self.zdim, store.dtype)
        with self._rw.write():
            self._ann = ann
            if chunk is not None:
                store.move_to_chunk(chunk, moved)
            store.drop_dead_chunks()
            self._manifest = manifest
        try:
            self._journal.reset()
        except OSError as e:  # harmless: replay skips records the snapshot covers
            log.warning("%s: could not truncate the journal: %s", self.path, e)
        collect_garbage(self._snapdir, manifest)

    # -- reads ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._store.slots

    @property
    def n_segments(self) -> int:
        return self._store.n_segments

    def _knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._reading():
            return self._ann.search(queries, k)

    def _lookup(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._store.segment_info(segment_ids)

    def _locate(self, track_id: str) -> Slot | None:
        return self._store.get(track_id)

    def get_vectors(self, track_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The exact stored vectors (n, zdim) float32 and start seconds (n,) of a track."""
        with self._reading():
            slot = self._located(track_id)
            return np.array(slot.vectors, dtype=np.float32), np.array(slot.starts)

    def gather_vectors(
        self, track_ids: list[str]
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """The stored segments of several tracks at once, for vectorised re-ranking.

        Returns (the tracks found, in the given order; their vectors concatenated (n, zdim)
        float32; their start seconds (n,); row offsets (len + 1,)). Unknown ids are skipped.
        """
        with self._reading():
            slots = [s for s in map(self._store.get, track_ids) if s is not None and s.n]
            offsets = np.zeros(len(slots) + 1, dtype=np.int64)
            np.cumsum([s.n for s in slots], out=offsets[1:])
            vectors = np.empty((int(offsets[-1]), self.zdim), dtype=np.float32)
            starts = np.empty(int(offsets[-1]), dtype=np.float64)
            for slot, a, b in zip(slots, offsets[:-1], offsets[1:], strict=True):
                vectors[a:b] = slot.vectors
                starts[a:b] = slot.starts
            return [s.track_id for s in slots], vectors, starts, offsets

    def segment_ids(self, track_id: str) -> np.ndarray:
        """The ids of a track's segments, in the order of `get_vectors` rows."""
        with self._reading():
            slot = self._located(track_id)
            return slot.ids

    def get_track(self, track_id: str) -> TrackRecord | None:
        return self._read_catalog(lambda catalog: catalog.get(track_id))

    def sequences(self, track_ids: list[str]) -> dict[str, bytes]:
        return self._read_catalog(lambda catalog: catalog.sequences(list(track_ids)))

    def _page(self, n: int, cursor: str | None) -> list[TrackRecord]:
        return self._read_catalog(lambda catalog: catalog.page(n, cursor))

    def stats(self) -> IndexStats:
        with self._reading():
            return IndexStats(
                tracks=len(self._store),
                segments=self._store.n_segments,
                bytes_on_disk=dir_size(self.path),
                factory=self.factory,
                vector_dtype=str(self._store.dtype),
                ann_trained=self._ann.trained,
                ann_trained_on=self._ann.trained_on,
                ann_on_gpu=self._ann.on_gpu,
                tombstones=len(self._ann.tombstones),
                seq=self._seq,
                snapshot_seq=self._manifest.seq,
                journal_records=self._journal.n_records,
                journal_bytes=self._journal.size_bytes,
            )

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the index (every acknowledged write is already durable)."""
        self._stop_catching_up()
        with self._writer, self._rw.write():
            if self._closed:
                return
            self._closed = True
            self._journal.close()
            self._catalog.close()
            self._lock.release()

    def __repr__(self) -> str:
        return (
            f"SegmentIndex({str(self.path)!r}, factory={self.factory!r}, "
            f"tracks={len(self._store)}, segments={self._store.n_segments})"
        )
