"""`open_store`: the segment store the settings configure, FAISS (default) or Milvus.

The service and `refrain index build` both open their store here, so an index built offline
is the one the service then opens, whichever backend is configured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refrain.index import (
    CorruptIndexError,
    IndexNotFoundError,
    IndexOptions,
    SegmentStore,
    open_index,
)
from refrain.service.settings import Settings


def open_store(
    settings: Settings, identity: dict[str, Any], factory: str | None = None
) -> SegmentStore:
    """Open (or create) the store in `settings.index_dir` for vectors of model `identity`.
    `factory` overrides `settings.index_factory` for a new FAISS index."""
    options = IndexOptions(
        vector_dtype=settings.vector_dtype,
        search_params=settings.index_search_params or None,
        snapshot_every_records=settings.snapshot_every_records,
        snapshot_every_bytes=settings.snapshot_every_bytes,
    )
    if settings.index_backend == "milvus":
        from refrain.index.milvus import MilvusOptions, open_milvus_index

        milvus = MilvusOptions(
            uri=settings.milvus_uri or None,
            token=settings.milvus_token,
            collection=settings.milvus_collection,
            index_type=settings.milvus_index_type,
        )
        return open_milvus_index(settings.index_dir, identity, milvus, options=options)
    return open_index(
        settings.index_dir, identity, factory=factory or settings.index_factory, options=options
    )


def stored_index_info(index_dir: Path) -> dict[str, Any]:
    """An existing index's `index.json` (either backend): its model `identity`, and for FAISS
    its `factory`; for commands that open an index without loading a model."""
    path = Path(index_dir) / "index.json"
    try:
        info = json.loads(path.read_text())
        if not isinstance(info["identity"], dict):
            raise TypeError("identity is not an object")
        return dict(info)
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {index_dir} (index.json is missing)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptIndexError(f"{path} has no readable identity: {e}") from e
