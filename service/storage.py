"""Free space on the data volume: a write that would leave less than `min_free_bytes` free is
refused with 507 before anything is written, so a full disk never takes the index down.

What a track costs on disk is its index write, not its upload: a 28 KB FLAC of 600 s becomes
a journal record of 120 segment vectors. `index_write_bytes` estimates that record (exactly,
as the journal encodes it, with room for the metadata) plus the catalog's SQLite pages.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from refrain.index.journal import record_size
from refrain.model.sequence import SEQUENCE_RATE, sequence_bytes
from refrain.service.errors import InsufficientStorage

META_ALLOWANCE = 16 << 10  # a track's metadata JSON in its journal record, at most
CATALOG_ALLOWANCE = 64 << 10  # the catalog's WAL pages for one written row and its index


def segment_count(duration_s: float, shingle_s: float, hop_s: float) -> int:
    """Segments of a track at the reference hop (one for audio shorter than a shingle)."""
    return max(1, math.ceil((duration_s - shingle_s) / hop_s - 1e-9) + 1)


def index_write_bytes(n_segments: int, zdim: int, duration_s: float = 0.0) -> int:
    """Disk bytes an index write of `n_segments` float32 vectors may take: its journal record
    and the catalog rows, with the chroma sequences of `duration_s` seconds in both (base64
    in the journal, raw bytes in the catalog)."""
    sequence = sequence_bytes(math.ceil(duration_s * SEQUENCE_RATE + 1), duration_s + 1)
    meta = META_ALLOWANCE + math.ceil(sequence * 4 / 3)
    return record_size(n_segments, zdim, 4, meta) + CATALOG_ALLOWANCE + sequence


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the filesystem that holds `path`."""
    return shutil.disk_usage(path).free


def stream_size(f: BinaryIO) -> int:
    """Length of a seekable stream (an upload's spooled file); its position is kept."""
    here = f.tell()
    try:
        return f.seek(0, os.SEEK_END)
    finally:
        f.seek(here)


@dataclass(frozen=True)
class SpaceGuard:
    path: Path  # any path on the volume written to (the data directory)
    keep_free: int  # bytes that must stay free after the write

    def require(self, needed: int, what: str = "the upload") -> None:
        """InsufficientStorage unless `needed` more bytes leave `keep_free`."""
        free = free_bytes(self.path)
        if free - needed < self.keep_free:
            raise InsufficientStorage(
                "insufficient_storage",
                f"{what} needs {needed} bytes, but the data volume has {free} bytes free and "
                f"keeps {self.keep_free} in reserve (REFRAIN_MIN_FREE_BYTES); free some space "
                "and send it again",
            )
