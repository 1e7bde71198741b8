"""Connecting to Milvus for `refrain.index.milvus`: the options, the client (Milvus Lite in the
index folder when no URI is given), the `index.json` descriptor, and the build and search
parameters of each Milvus index type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import INDEX_FILE
from .types import IndexNotFoundError, SegmentIndexError

FORMAT_NAME = "refrain-milvus-index"
FORMAT_VERSION = 1
LITE_FILE = "milvus.db"
IDENTITY_PROPERTY = "refrain.identity"


class BackendUnavailableError(SegmentIndexError):
    """Milvus could not be reached or refused an operation; retry later."""


@dataclass(frozen=True)
class MilvusOptions:
    """Where the Milvus collection is and how it is indexed."""

    # Milvus server, e.g. "http://milvus:19530"; None: Milvus Lite inside the index directory
    uri: str | None = None
    # "user:password" or an API token; "" for none
    token: str = ""
    # Milvus database; "" = the default database
    db_name: str = ""
    # collection holding the segments
    collection: str = "refrain_segments"
    # Milvus index type fixed at creation: FLAT (exact), IVF_FLAT, HNSW, ...
    index_type: str = "FLAT"
    # build parameters; {} = M 32 / efConstruction 200 for HNSW, nlist 1024 for IVF
    index_params: dict[str, Any] = field(default_factory=dict)
    # search parameters; {} = ef max(k, 128) for HNSW, nprobe 16 for IVF
    search_params: dict[str, Any] = field(default_factory=dict)


def read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / INDEX_FILE).read_text())
    except ValueError as e:
        raise IndexNotFoundError(f"{path / INDEX_FILE} is not valid JSON: {e}") from e
    if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
        raise IndexNotFoundError(
            f"{path} is not a Refrain Milvus index (format "
            f"{info.get('format')!r} version {info.get('version')!r})"
        )
    return info


def connect(path: Path, opts: MilvusOptions) -> Any:  # a pymilvus MilvusClient
    try:
        from pymilvus import MilvusClient
    except ImportError as e:
        raise ImportError("the Milvus backend needs pymilvus: pip install 'refrain[milvus]'") from e
    kwargs: dict[str, Any] = {"uri": opts.uri or str(path / LITE_FILE)}
    if opts.token:
        kwargs["token"] = opts.token
    if opts.db_name:
        kwargs["db_name"] = opts.db_name
    try:
        return MilvusClient(**kwargs)
    except Exception as e:
        raise BackendUnavailableError(f"cannot connect to Milvus at {kwargs['uri']}: {e}") from e


def default_build(index_type: str) -> dict[str, Any]:
    kind = index_type.upper()
    if kind.startswith("HNSW"):
        return {"M": 32, "efConstruction": 200}
    if kind.startswith("IVF"):
        return {"nlist": 1024}
    return {}


def default_search(index_type: str, k: int) -> dict[str, Any]:
    kind = index_type.upper()
    if kind.startswith("HNSW"):
        return {"ef": max(k, 128)}
    if kind.startswith("IVF"):
        return {"nprobe": 16}
    return {}


def hit_id(hit: Any) -> int:
    entity = hit.get("entity") or {}
    return int(entity["segment_id"] if "segment_id" in entity else hit["id"])
