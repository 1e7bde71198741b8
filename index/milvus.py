"""`MilvusSegmentIndex`: reference segments in Milvus, for catalogs beyond one machine's memory.

    from refrain.index.milvus import MilvusOptions, open_milvus_index

    with open_milvus_index("data/index", identity, MilvusOptions(uri="http://milvus:19530")) as ix:
        ix.add_track(TrackRecord("t1"), vectors, starts_s)
        distances, segment_ids = ix.search(queries, k=100)

It is a `SegmentStore`, as `SegmentIndex` is, so the ranking (`refrain.search`) and the service use
either. Where things live:

- the Milvus collection (default `refrain_segments`): one row per segment, `segment_id` (int64
  primary key), `track_id`, `start_s`, `vector` (float32, L2 metric); the model identity in the
  collection property `refrain.identity`. With no URI, Milvus Lite keeps it in
  `<path>/milvus.db`;
- `<path>/index.json`: format, identity, collection and index type, written once;
- `<path>/catalog.sqlite`: track metadata and segment starts (`index.milvus_catalog`).

A write reserves a fresh id range (recorded as pending), inserts the vectors into Milvus, then
commits the track in SQLite in one transaction: that is the point where it is acknowledged.
Ranges of replaced and deleted tracks are deleted from Milvus after the commit; ranges left
pending or undeleted by a crash are deleted at the next open. Searches map ids through the
committed catalog, so vectors Milvus holds for uncommitted or removed writes never surface.
One process may have the index open (the same `flock` as the FAISS store).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .files import (
    CATALOG_FILE,
    INDEX_FILE,
    LOCK_FILE,
    WriterLock,
    check_identity,
    check_new_index_dir,
    dir_size,
    identity_diff,
    make_index_dir,
    validate_identity,
    write_json_atomic,
)
from .milvus_catalog import MilvusCatalog, Range, Spans
from .milvus_client import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IDENTITY_PROPERTY,
    BackendUnavailableError,
    MilvusOptions,
    connect,
    default_build,
    default_search,
    hit_id,
    read_info,
)
from .rwlock import RWLock
from .segment_store import Item, StoreBase, write_decision
from .types import (
    AddResult,
    CorruptIndexError,
    IdentityMismatchError,
    IndexOptions,
    IndexStats,
    SegmentIndexError,
    TrackRecord,
)
from .validate import check_segments, check_track

log = logging.getLogger(__name__)

__all__ = ["BackendUnavailableError", "MilvusOptions", "MilvusSegmentIndex", "open_milvus_index"]

T = TypeVar("T")

INSERT_BATCH = 1000  # rows per Milvus insert call
SEARCH_BATCH = 1024  # query vectors per Milvus search call


def open_milvus_index(
    path: str | Path,
    identity: dict[str, Any],
    milvus: MilvusOptions | None = None,
    create: bool = True,
    options: IndexOptions | None = None,
) -> MilvusSegmentIndex:
    """Open (or create) the Milvus-backed index whose local state is at `path`.

    An index or collection built by another model raises `IdentityMismatchError`.
    """
    milvus = milvus or MilvusOptions()
    options = options or IndexOptions()
    if (options.vector_dtype or "float32") != "float32":
        raise ValueError(
            f"the Milvus backend stores float32 vectors, got vector_dtype={options.vector_dtype!r}"
        )
    identity = validate_identity(identity)
    path = Path(path)
    if not (path / INDEX_FILE).exists():
        check_new_index_dir(path, create)
        make_index_dir(path)
    lock = WriterLock(path)
    try:
        if (path / INDEX_FILE).exists():
            info = read_info(path)
            check_identity(path, info["identity"], identity)
            if info["collection"] != milvus.collection:
                raise ValueError(
                    f"index at {path} uses collection {info['collection']!r}, "
                    f"got {milvus.collection!r}"
                )
            return MilvusSegmentIndex(path, info, milvus, options, lock)
        info = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "identity": identity,
            "zdim": identity["zdim"],
            "collection": milvus.collection,
            "index_type": milvus.index_type,
            "vector_dtype": "float32",
            "created_at": time.time(),
        }
        try:
            index = MilvusSegmentIndex(path, info, milvus, options, lock)
        except BaseException:  # leave the directory as fresh as it was
            for p in path.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            raise
        write_json_atomic(path / INDEX_FILE, info)  # created: the collection checked out
        return index
    except BaseException:
        lock.release()
        raise


class MilvusSegmentIndex(StoreBase):
    """Reference segments in Milvus with their tracks in SQLite. Use `open_milvus_index`."""

    def __init__(
        self,
        path: Path,
        info: dict[str, Any],
        milvus: MilvusOptions,
        options: IndexOptions,
        lock: WriterLock,
    ) -> None:
        self.path = path
        self.identity: dict[str, Any] = info["identity"]
        self.zdim: int = info["zdim"]
        self.factory: str = info["index_type"]
        self.collection: str = info["collection"]
        self.milvus = milvus
        self.options = options
        self._lock = lock
        self._rw = RWLock()
        self._writer = threading.Lock()
        self._closed = False
        self._catalog = MilvusCatalog(path / CATALOG_FILE)
        try:
            self._client = connect(path, milvus)
            try:
                self._open_collection()
                self._spans = Spans()
                for track_id, first, starts in self._catalog.spans():
                    self._spans.put(track_id, first, starts)
                self._seq = self._catalog.applied_seq()
                # segments Milvus may hold that no committed track owns: searches fetch this
                # many more neighbours, then skip them
                self._hidden = sum(n for _, _, n in self._catalog.leftovers())
                for table, first, n in self._catalog.leftovers():
                    self._collect(table, (first, n))
            except BaseException:
                self._client.close()
                raise
        except BaseException:
            self._catalog.close()
            raise

    # -- the collection ---------------------------------------------------------------------

    def _open_collection(self) -> None:
        c, name = self._client, self.collection
        if c.has_collection(name):
            props = c.describe_collection(name).get("properties") or {}
            try:
                stored = json.loads(props[IDENTITY_PROPERTY])
            except (KeyError, ValueError):
                raise IdentityMismatchError(
                    f"Milvus collection {name!r} holds no Refrain model identity: it was not "
                    "made by Refrain; pick another collection name"
                ) from None
            diff = identity_diff(stored, self.identity)
            if diff:
                raise IdentityMismatchError(
                    f"Milvus collection {name!r} was built by a different embedding model ("
                    + "; ".join(diff)
                    + ")"
                )
            c.load_collection(name)
            fresh = self._catalog.state("next_segment_id") == 0
            if fresh and self._count() > 0:
                raise CorruptIndexError(
                    f"Milvus collection {name!r} already holds {self._count()} segments that "
                    f"the catalog at {self.path} does not know: restore that catalog from a "
                    "backup, or use another collection name"
                )
            return
        if self._catalog.count():
            raise CorruptIndexError(
                f"the catalog at {self.path} lists {self._catalog.count()} tracks but Milvus "
                f"has no collection {name!r}: restore the collection from a backup, or move "
                f"{self.path} away and rebuild the index"
            )
        from pymilvus import DataType

        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("segment_id", DataType.INT64, is_primary=True)
        schema.add_field("track_id", DataType.VARCHAR, max_length=1024)
        schema.add_field("start_s", DataType.DOUBLE)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.zdim)
        params = c.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=self.factory,
            metric_type="L2",
            params=self.milvus.index_params or default_build(self.factory),
        )
        c.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
        c.alter_collection_properties(
            name, properties={IDENTITY_PROPERTY: json.dumps(self.identity, sort_keys=True)}
        )
        c.load_collection(name)

    def _count(self) -> int:
        rows = self._call(
            "count", self._client.query, self.collection, filter="", output_fields=["count(*)"]
        )
        return int(rows[0]["count(*)"])

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise BackendUnavailableError(
                f"Milvus {what} on {self.collection!r} failed: {e}"
            ) from e

    def _insert(self, track_id: str, first: int, starts: np.ndarray, vectors: np.ndarray) -> None:
        for a in range(0, len(vectors), INSERT_BATCH):
            rows = [
                {
                    "segment_id": first + i,
                    "track_id": track_id,
                    "start_s": float(starts[i]),
                    "vector": vectors[i],
                }
                for i in range(a, min(a + INSERT_BATCH, len(vectors)))
            ]
            self._call("insert", self._client.insert, self.collection, rows)

    def _collect(self, table: str, span: Range) -> None:
        """Delete a pending or garbage id range from Milvus, then forget it (best effort)."""
        first, n = span
        try:
            self._call(
                "delete",
                self._client.delete,
                self.collection,
                filter=f"segment_id >= {first} and segment_id < {first + n}",
            )
            self._catalog.forget(table, first)
            self._hidden -= n
        except SegmentIndexError as e:  # retried at the next open; searches skip it meanwhile
            log.warning(
                "%s: could not delete segments %d..%d: %s", self.path, first, first + n - 1, e
            )

    # -- writes ---------------------------------------------------------------------------

    def _write_tracks(self, items: list[Item], replace: bool, must_exist: bool) -> list[AddResult]:
        """Each of `items` in turn (Milvus has its own durability)."""
        return [self._write_track(*item, replace, must_exist) for item in items]

    def _write_track(
        self,
        track: TrackRecord,
        vectors: np.ndarray,
        starts_s: np.ndarray,
        replace: bool,
        must_exist: bool,
    ) -> AddResult:
        check_track(track)
        stored, starts = check_segments(vectors, starts_s, self.zdim, np.dtype(np.float32))
        with self._writer:
            self._check_open()
            decision = write_decision(track, self._catalog.get(track.track_id), replace, must_exist)
            if decision is AddResult.UNCHANGED:
                return decision
            first = self._catalog.reserve(len(starts))
            self._hidden += len(starts)
            try:
                self._insert(track.track_id, first, starts, stored)
            except SegmentIndexError:
                self._collect("pending", (first, len(starts)))
                raise
            meta = dataclasses.replace(track, n_segments=len(starts), added_at=time.time())
            old = self._spans.get(track.track_id)
            old_range = (old[0], len(old[1])) if old is not None else None
            self._catalog.commit_track(self._seq + 1, meta.to_stored(), first, starts, old_range)
            with self._rw.write():
                self._spans.put(track.track_id, first, starts)
                self._seq += 1
                self._hidden += (old_range[1] if old_range else 0) - len(starts)
            if old_range is not None:
                self._collect("garbage", old_range)
        return decision

    def delete_track(self, track_id: str) -> bool:
        """Remove a track and its segments; False if there was none."""
        with self._writer:
            self._check_open()
            span = self._spans.get(track_id)
            if span is None:
                return False
            old_range = (span[0], len(span[1]))
            self._catalog.commit_delete(self._seq + 1, track_id, old_range)
            with self._rw.write():
                self._spans.remove(track_id)
                self._seq += 1
                self._hidden += old_range[1]
            self._collect("garbage", old_range)
        return True

    def snapshot(self) -> None:
        """Flush Milvus's growing segments and checkpoint the catalog (before a backup)."""
        with self._writer:
            self._check_open()
            self._call("flush", self._client.flush, self.collection)
            self._catalog.set_snapshot_seq(self._seq)

    # -- reads ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, track_id: object) -> bool:
        return track_id in self._spans

    @property
    def n_segments(self) -> int:
        return self._spans.n_segments

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances = np.full((len(q), k), np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if k == 0 or len(q) == 0:
            return distances, ids
        with self._reading():
            if self._spans.n_segments == 0:
                return distances, ids
            limit = min(k + max(self._hidden, 0), 16384)
            params = {
                "metric_type": "L2",
                "params": self.milvus.search_params or default_search(self.factory, limit),
            }
            for a in range(0, len(q), SEARCH_BATCH):
                batch = q[a : a + SEARCH_BATCH]
                result = self._call(
                    "search",
                    self._client.search,
                    self.collection,
                    data=list(batch),
                    limit=limit,
                    anns_field="vector",
                    search_params=params,
                    output_fields=["segment_id"],
                )
                for row, hits in enumerate(result, start=a):
                    col = 0
                    for hit in hits:
                        sid = hit_id(hit)
                        # skip uncommitted or removed writes
                        if col < k and self._spans.is_live(sid):
                            ids[row, col], distances[row, col] = sid, hit["distance"]
                            col += 1
        return distances, ids

    def _lookup(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._spans.lookup(segment_ids)

    def _locate(self, track_id: str) -> tuple[int, np.ndarray] | None:
        return self._spans.get(track_id)

    def get_vectors(self, track_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors (n, zdim) float32 and start seconds (n,) of a track."""
        with self._reading():
            span = self._located(track_id)
            first, starts = span
            rows = self._call(
                "get",
                self._client.get,
                self.collection,
                ids=list(range(first, first + len(starts))),
                output_fields=["segment_id", "vector"],
            )
        if len(rows) != len(starts):
            raise CorruptIndexError(
                f"Milvus holds {len(rows)} of the {len(starts)} segments of track {track_id!r}"
            )
        rows = sorted(rows, key=lambda r: r["segment_id"])
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32)
        return vectors.reshape(len(starts), self.zdim), np.array(starts)

    def gather_vectors(
        self, track_ids: list[str]
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Several tracks' stored segments in one round trip; see `SegmentIndex.gather_vectors`."""
        with self._reading():
            spans = [
                (t, span)
                for t in track_ids
                if (span := self._spans.get(t)) is not None and len(span[1])
            ]
            ids = [i for _, (first, starts) in spans for i in range(first, first + len(starts))]
            rows = (
                self._call(
                    "get",
                    self._client.get,
                    self.collection,
                    ids=ids,
                    output_fields=["segment_id", "vector"],
                )
                if ids
                else []
            )
        by_id = {r["segment_id"]: r["vector"] for r in rows}
        if len(by_id) != len(ids):
            raise CorruptIndexError(
                f"Milvus holds {len(by_id)} of the {len(ids)} segments of "
                f"tracks {[t for t, _ in spans]}"
            )
        offsets = np.zeros(len(spans) + 1, dtype=np.int64)
        np.cumsum([len(starts) for _, (_, starts) in spans], out=offsets[1:])
        vectors = np.asarray([by_id[i] for i in ids], dtype=np.float32).reshape(-1, self.zdim)
        starts = np.concatenate(
            [np.asarray(st, dtype=np.float64) for _, (_, st) in spans] or [np.zeros(0)]
        )
        return [t for t, _ in spans], vectors, starts, offsets

    def segment_ids(self, track_id: str) -> np.ndarray:
        """The ids of a track's segments, in the order of `get_vectors` rows."""
        with self._rw.read():
            span = self._located(track_id)
        return np.arange(span[0], span[0] + len(span[1]), dtype=np.int64)

    def get_track(self, track_id: str) -> TrackRecord | None:
        self._check_open()
        return self._catalog.get(track_id)

    def sequences(self, track_ids: list[str]) -> dict[str, bytes]:
        self._check_open()
        return self._catalog.sequences(list(track_ids))

    def _page(self, n: int, cursor: str | None) -> list[TrackRecord]:
        self._check_open()
        return self._catalog.page(n, cursor)

    def stats(self) -> IndexStats:
        self._check_open()
        snapshot_seq = self._catalog.state("snapshot_seq")
        return IndexStats(
            tracks=len(self._spans),
            segments=self._spans.n_segments,
            bytes_on_disk=dir_size(self.path),
            factory=self.factory,
            vector_dtype="float32",
            ann_trained=True,
            ann_trained_on=self._spans.n_segments,
            ann_on_gpu=False,
            tombstones=max(self._hidden, 0),
            seq=self._seq,
            snapshot_seq=snapshot_seq,
            journal_records=self._seq - snapshot_seq,
            journal_bytes=0,
        )

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        with self._writer, self._rw.write():
            if self._closed:
                return
            self._closed = True
            try:
                self._client.close()
            finally:
                self._catalog.close()
                self._lock.release()

    def __repr__(self) -> str:
        return (
            f"MilvusSegmentIndex({str(self.path)!r}, collection={self.collection!r}, "
            f"index_type={self.factory!r}, tracks={len(self._spans)}, "
            f"segments={self._spans.n_segments})"
        )
