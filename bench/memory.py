"""Memory figures of bench/search.py: the process's resident and peak sizes, what a FAISS
index costs per vector, and the peak an index build of N tracks reaches (to skip settings that
would not fit in the machine's memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from pathlib import Path

import numpy as np

from refrain.index import IndexOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_data import SEGMENTS


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> tuple[int, int]:
    """(current, peak since the last reset) resident set size of this process, bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so that the next build's RSS
    growth is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def ann_bytes_per_vector(factory: str, zdim: int) -> float:
    """Rough size of one vector inside a FAISS index of `factory` (codes, id, graph)."""
    code = 4.0 * zdim
    for part in factory.split(","):
        if part.startswith("PQ"):
            code = float(part[2:].split("x")[0])
        elif part == "SQ8":
            code = float(zdim)
        elif part in ("SQfp16", "SQ16"):
            code = 2.0 * zdim
    graph = 0.0
    if factory.startswith("HNSW"):
        m = int("".join(ch for ch in factory[4:].split(",")[0] if ch.isdigit()) or 32)
        graph = 2 * m * 4 * 1.1
    return code + 8 + graph


def peak_bytes(n_tracks: int, zdim: int, dtype: str, factory: str, tmpfs: bool) -> int:
    """Estimated peak memory of building one index: FAISS in RAM and the vectors written since
    the last snapshot; on tmpfs also the exact copy, the journal and, during the final
    snapshot, the old and the new ANN file."""
    n = n_tracks * SEGMENTS
    ann = n * ann_bytes_per_vector(factory, zdim)
    exact = n * zdim * np.dtype(dtype).itemsize
    pending = min(
        exact, IndexOptions().snapshot_every_records * SEGMENTS * zdim * np.dtype(dtype).itemsize
    )
    total = ann + pending
    if tmpfs:
        total += exact + pending + (0 if factory == "Flat" else 2 * ann)
    return int(total)
