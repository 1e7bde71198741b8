"""What every store of reference segments offers, and the parts the backends share.

`SegmentStore` is the Protocol the reducer (`search.rank_tracks`), the service and the
command line program against: the FAISS store (`store.SegmentIndex`) and the Milvus store
(`milvus.MilvusSegmentIndex`) both satisfy it. `StoreBase` holds what they would otherwise
write twice: the add/replace entry points and their batch checks, the decision between
added, unchanged, replaced and refused, paging, and the context manager.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from .rwlock import RWLock
from .types import (
    AddResult,
    IndexClosedError,
    IndexStats,
    TrackExistsError,
    TrackNotFoundError,
    TrackRecord,
)
from .validate import check_k, check_queries

Item = tuple[TrackRecord, np.ndarray, np.ndarray]  # (track, vectors (n, zdim), starts_s (n,))

MAX_PAGE = 10_000


@runtime_checkable
class SegmentStore(Protocol):
    """A durable store of reference tracks and their segment vectors, searchable by kNN."""

    path: Path
    identity: dict[str, Any]  # the model (and reference hop) the stored vectors come from
    zdim: int
    factory: str  # the ANN structure: a FAISS factory string or a Milvus index type

    def add_track(
        self,
        track: TrackRecord,
        vectors: np.ndarray,
        starts_s: np.ndarray,
        *,
        replace: bool = False,
    ) -> AddResult: ...
    def add_tracks(self, items: list[Item], *, replace: bool = False) -> list[AddResult]: ...
    def replace_track(
        self, track: TrackRecord, vectors: np.ndarray, starts_s: np.ndarray
    ) -> AddResult: ...
    def delete_track(self, track_id: str) -> bool: ...
    def snapshot(self) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def segment_info(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def get_vectors(self, track_id: str) -> tuple[np.ndarray, np.ndarray]: ...
    def gather_vectors(
        self, track_ids: list[str]
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]: ...
    def segment_ids(self, track_id: str) -> np.ndarray: ...
    def get_track(self, track_id: str) -> TrackRecord | None: ...
    # the stored chroma sequences of those tracks that have one (`TrackRecord.sequence`)
    def sequences(self, track_ids: list[str]) -> dict[str, bytes]: ...
    def list_tracks(
        self, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[TrackRecord], str | None]: ...
    def stats(self) -> IndexStats: ...
    @property
    def failure(self) -> str | None: ...  # why the store cannot serve everything; None: it can
    @property
    def n_segments(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, track_id: object) -> bool: ...

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


class _Stored(Protocol):
    @property
    def content_sha256(self) -> str | None: ...


def write_decision(
    track: TrackRecord, existing: _Stored | None, replace: bool, must_exist: bool
) -> AddResult:
    """What writing `track` over `existing` (None: not stored) does: ADDED, UNCHANGED (same
    content hash, nothing is written), REPLACED; or TrackNotFoundError / TrackExistsError."""
    if existing is None:
        if must_exist:
            raise TrackNotFoundError(f"no track {track.track_id!r} to replace")
        return AddResult.ADDED
    if track.content_sha256 and existing.content_sha256 == track.content_sha256:
        return AddResult.UNCHANGED
    if not replace:
        raise TrackExistsError(_exists_message(track, existing.content_sha256))
    return AddResult.REPLACED


def _exists_message(track: TrackRecord, stored: str | None) -> str:
    """Why `track` may not overwrite the stored track of its id, naming what differs: the audio
    (both content hashes known), or that without a hash the store cannot tell."""
    given = track.content_sha256
    if stored and given:
        what = f"with other audio (content_sha256 {_short(stored)} stored, {_short(given)} given)"
    else:
        unhashed = "the stored one has no" if given else "the new one has no"
        if not (stored or given):
            unhashed = "neither has a"
        what = (
            f"({unhashed} content_sha256, so whether the audio is the same is unknown; set "
            "TrackRecord.content_sha256 to make adding the same audio again a no-op)"
        )
    return f"track {track.track_id!r} is already stored {what}; pass replace=True to replace it"


def _short(digest: str) -> str:
    return digest if len(digest) <= 12 else digest[:12] + "..."


def check_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be an int in 1..{MAX_PAGE}, got {limit!r}")
    return limit


class StoreBase:
    """The shared half of a segment store. A backend provides `_write_tracks` (all of
    `items` checked, then written durably; one result each) and `_page` (up to `n` tracks
    by id after `cursor`), and sets `path` and `_closed`."""

    path: Path
    zdim: int
    _closed: bool
    _rw: RWLock

    def _write_tracks(self, items: list[Item], replace: bool, must_exist: bool) -> list[AddResult]:
        raise NotImplementedError

    def _page(self, n: int, cursor: str | None) -> list[TrackRecord]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- writes ---------------------------------------------------------------------------

    def add_track(
        self,
        track: TrackRecord,
        vectors: np.ndarray,
        starts_s: np.ndarray,
        *,
        replace: bool = False,
    ) -> AddResult:
        """Store `track` with its segment `vectors` (n, zdim) starting at `starts_s` (n,).

        The same track id with the same `content_sha256` is UNCHANGED (nothing written); with
        other content it raises `TrackExistsError`, unless `replace` is set. Durable on return.
        """
        return self._write_tracks([(track, vectors, starts_s)], replace, must_exist=False)[0]

    def add_tracks(self, items: list[Item], *, replace: bool = False) -> list[AddResult]:
        """`add_track` for many (track, vectors, starts) at once. A track id twice in
        `items` raises `ValueError` before anything is written."""
        ids = [track.track_id for track, _, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"track ids repeated in one batch: "
                f"{sorted({t for t in ids if ids.count(t) > 1})[:5]}"
            )
        return self._write_tracks(items, replace, must_exist=False)

    def replace_track(
        self, track: TrackRecord, vectors: np.ndarray, starts_s: np.ndarray
    ) -> AddResult:
        """Replace an existing track (`TrackNotFoundError` if absent); UNCHANGED if identical."""
        return self._write_tracks([(track, vectors, starts_s)], True, must_exist=True)[0]

    # -- reads ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexClosedError(f"index at {self.path} is closed")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the read lock of an open store."""
        with self._rw.read():
            self._check_open()
            yield

    def list_tracks(
        self, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[TrackRecord], str | None]:
        """Up to `limit` tracks by track id after `cursor`, and the cursor of the next page
        (None on the last page). Pages are stable under concurrent writes."""
        limit = check_limit(limit)
        rows = self._page(limit + 1, cursor)
        if len(rows) > limit:
            return rows[:limit], rows[limit - 1].track_id
        return rows, None

    def _knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and ids of the `k` nearest (checked) queries, under the lock."""
        raise NotImplementedError

    def _lookup(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _locate(self, track_id: str) -> Any:
        """Where a track's segments are (backend-specific); None: no such track."""
        raise NotImplementedError

    def _located(self, track_id: str) -> Any:
        found = self._locate(track_id)
        if found is None:
            raise TrackNotFoundError(f"no track {track_id!r}")
        return found

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest stored segments of each query: (nsqeuc distances, segment ids).

        Both are (q, k), ascending by distance; missing neighbours have id -1 and distance inf.
        """
        q = check_queries(queries, self.zdim)
        distances, ids = self._knn(q, check_k(k))
        return distances / np.float32(self.zdim), ids

    def segment_info(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Track id (object array) and start second of each segment id, same shape.

        Unknown ids, -1 and segments of tracks deleted since the search give (None, NaN).
        """
        with self._reading():
            return self._lookup(segment_ids)

    @property
    def failure(self) -> str | None:
        return "closed" if self._closed else None

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
