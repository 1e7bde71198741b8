"""Records, options and errors shared by the index modules."""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "AddResult",
    "CatalogUnavailableError",
    "CorruptIndexError",
    "IdentityMismatchError",
    "IndexClosedError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexOptions",
    "IndexStats",
    "InsufficientStorageError",
    "SegmentIndexError",
    "TrackExistsError",
    "TrackNotFoundError",
    "TrackRecord",
]


class SegmentIndexError(Exception):
    """Base class of every error raised by `index`."""


class IdentityMismatchError(SegmentIndexError):
    """The index on disk was built by a different embedding model."""


class IndexLockedError(SegmentIndexError):
    """Another process holds the index open for writing."""


class IndexNotFoundError(SegmentIndexError, FileNotFoundError):
    """No index at the path and `create=False`, or the path is not an index."""


class IndexClosedError(SegmentIndexError):
    """The index was closed (or disabled by an earlier failed write)."""


class CorruptIndexError(SegmentIndexError):
    """Files on disk contradict each other in a way recovery must not guess about."""


class InsufficientStorageError(SegmentIndexError):
    """The disk holding the index is full: the write was not made and nothing changed.
    Writes succeed again once space is freed, with no reopen."""


class CatalogUnavailableError(SegmentIndexError):
    """The SQLite catalog could not take a write (disk full, I/O error) and is behind the
    journal; reads of it resume once it has caught up, which every later call retries."""


class TrackExistsError(SegmentIndexError):
    """`add_track` found the track id with different content and `replace` was not set."""


class TrackNotFoundError(SegmentIndexError, KeyError):
    """The track id is not in the index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AddResult(enum.StrEnum):
    """What `add_track` did."""

    ADDED = "added"
    REPLACED = "replaced"
    UNCHANGED = "unchanged"  # same track id and same content_sha256: nothing written


@dataclass(frozen=True)
class TrackRecord:
    """Metadata of one reference track. `n_segments` and `added_at` are set by the index."""

    track_id: str  # caller-chosen unique id, the primary key
    title: str = ""
    artist: str = ""
    work_id: str | None = None  # the work (composition) this track is a version of
    duration_s: float | None = None
    content_sha256: str | None = None  # hash of the audio; identical content is not re-added
    n_segments: int = 0  # number of stored segments (set by the index)
    added_at: float | None = None  # unix time of the write that stored it (set by the index)
    # the chroma sequence alignment verification reads (`refrain.model.sequence`), stored with
    # the track and read back with `sequences()`; the catalog's reads leave it out (None)
    sequence: bytes | None = field(default=None, repr=False, compare=False)

    def to_stored(self) -> dict[str, Any]:
        """The record as the journal and snapshots keep it: its fields in order, the sequence
        last, in base64, and only when there is one."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sequence"}
        if self.sequence is not None:
            out["sequence"] = base64.b64encode(self.sequence).decode("ascii")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrackRecord:
        names = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names and k != "sequence"})
        seq = data.get("sequence")
        return replace(record, sequence=stored_sequence(seq)) if seq is not None else record


def stored_sequence(value: str | bytes | None) -> bytes | None:
    """A stored record's sequence: base64 text (journal, snapshot) or bytes (catalog)."""
    if value is None or isinstance(value, bytes):
        return value
    return base64.b64decode(value, validate=True)


@dataclass(frozen=True)
class IndexOptions:
    """Tuning of an open index. Options fixed at creation are read back from disk on open."""

    # dtype of the exact segment copy, fixed at creation: "float32" or "float16"
    # (None: float32 for a new index, the stored one otherwise)
    vector_dtype: str | None = None
    # snapshot automatically once the journal holds this many records ...
    snapshot_every_records: int = 10_000
    # ... or this many bytes
    snapshot_every_bytes: int = 512 << 20
    # FAISS ParameterSpace string applied to the ANN index, e.g. "nprobe=32,efSearch=256";
    # None: nprobe=16 for IVF, efSearch=128 for HNSW
    search_params: str | None = None
    # compact (rewrite vector chunks, rebuild a non-removable ANN index) at a snapshot once
    # this fraction of the stored segments belongs to deleted or replaced tracks
    compact_dead_fraction: float = 0.25
    # put the ANN index on GPU 0: None = when FAISS sees a GPU, False = never
    use_gpu: bool | None = None
    # seed of the training-sample draw for IVF/PQ factories
    train_seed: int = 1234

    def __post_init__(self) -> None:
        if self.snapshot_every_records < 1 or self.snapshot_every_bytes < 1:
            raise ValueError(
                "snapshot_every_records and snapshot_every_bytes must be >= 1, got "
                f"{self.snapshot_every_records} and {self.snapshot_every_bytes}"
            )
        if not 0.0 < self.compact_dead_fraction <= 1.0:
            raise ValueError(
                f"compact_dead_fraction must be in (0, 1], got {self.compact_dead_fraction}"
            )


@dataclass(frozen=True)
class IndexStats:
    """A summary of the index, as returned by `SegmentIndex.stats()`."""

    tracks: int  # live tracks
    segments: int  # live segments
    bytes_on_disk: int  # all files of the index directory
    factory: str  # FAISS factory string
    vector_dtype: str  # dtype of the exact copy
    ann_trained: bool  # False while an IVF/PQ factory waits for enough vectors (exact search)
    ann_trained_on: int  # vectors present at the last training (retrained after 10x growth)
    ann_on_gpu: bool
    tombstones: int  # removed segments still inside a non-removable ANN index
    seq: int  # sequence number of the last write
    snapshot_seq: int  # sequence number covered by the last snapshot
    journal_records: int  # records in the journal since that snapshot
    journal_bytes: int
