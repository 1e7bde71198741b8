"""The persistent, crash-safe store of reference segments.

    from refrain.index import open_index, TrackRecord

    with open_index("catalog.idx", model_identity, factory="IVF1024,Flat") as index:
        index.add_track(TrackRecord("t1", title="Song"), vectors, starts_s)
        distances, segment_ids = index.search(query_vectors, k=100)
        track_ids, starts_s = index.segment_info(segment_ids)

See `refrain.index.store` for the durability design and `refrain.index.snapshot` for the files
on disk; `SegmentStore` is what the FAISS store and the Milvus store (`refrain.index.milvus`) both
offer.
"""

from .segment_store import SegmentStore
from .store import SegmentIndex, open_index
from .types import (
    AddResult,
    CatalogUnavailableError,
    CorruptIndexError,
    IdentityMismatchError,
    IndexClosedError,
    IndexLockedError,
    IndexNotFoundError,
    IndexOptions,
    IndexStats,
    InsufficientStorageError,
    SegmentIndexError,
    TrackExistsError,
    TrackNotFoundError,
    TrackRecord,
)

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
    "SegmentIndex",
    "SegmentIndexError",
    "SegmentStore",
    "TrackExistsError",
    "TrackNotFoundError",
    "TrackRecord",
    "open_index",
]
