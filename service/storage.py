"""Free space on the data volume: a write that would leave less than `min_free_bytes` free is
refused with 507 before anything is written, so a full disk never takes the index down."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.errors import ApiError


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
        """ApiError(507, insufficient_storage) unless `needed` more bytes leave `keep_free`."""
        free = free_bytes(self.path)
        if free - needed < self.keep_free:
            raise ApiError(
                507, "insufficient_storage",
                f"{what} needs {needed} bytes, but the data volume has {free} bytes free and "
                f"keeps {self.keep_free} in reserve (REFRAIN_MIN_FREE_BYTES); free some space "
                "and send it again",
            )
