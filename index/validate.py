"""Checks of caller input, with messages that say what was expected and what came."""

from __future__ import annotations

import numpy as np

from .types import TrackRecord

MAX_TRACK_ID_LENGTH = 512


def check_track(track: TrackRecord) -> None:
    if not isinstance(track, TrackRecord):
        raise TypeError(f"expected a TrackRecord, got {type(track).__name__}")
    tid = track.track_id
    if not isinstance(tid, str) or not tid or len(tid) > MAX_TRACK_ID_LENGTH:
        raise ValueError(
            f"track_id must be a non-empty str of at most {MAX_TRACK_ID_LENGTH} "
            f"characters, got {tid!r}"
        )
    if "\x00" in tid:
        raise ValueError(f"track_id must not contain NUL characters, got {tid!r}")


def _float_matrix(array: object, zdim: int, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 2 or a.shape[1] != zdim:
        raise ValueError(f"expected {what} of shape (n, {zdim}), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"expected floating-point {what}, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return a


def check_segments(
    vectors: object, starts_s: object, zdim: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors as `dtype` (n, zdim) and starts as float64 (n,), or a ValueError."""
    v = _float_matrix(vectors, zdim, "vectors")
    n = len(v)
    if n == 0:
        raise ValueError("a track needs at least one segment, got 0 vectors")
    starts = np.asarray(starts_s, dtype=np.float64)
    if starts.shape != (n,):
        raise ValueError(f"expected {n} start times (one per vector), got shape {starts.shape}")
    if not np.isfinite(starts).all() or (starts < 0).any():
        raise ValueError("start times must be finite and >= 0 seconds")
    with np.errstate(over="ignore"):
        stored = np.array(v, dtype=dtype, order="C", copy=True)  # never alias caller memory
    if not np.isfinite(stored).all():
        raise ValueError(f"vectors overflow {dtype} (|x| > {np.finfo(dtype).max})")
    return stored, starts


def check_queries(queries: object, zdim: int) -> np.ndarray:
    q = _float_matrix(queries, zdim, "queries")
    return np.ascontiguousarray(q, dtype=np.float32)


def check_k(k: object) -> int:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 0 <= k <= 100_000:
        raise ValueError(f"k must be an int in 0..100000, got {k!r}")
    return int(k)
