"""Cross-recurrence plots of one query against a shortlist of references, batched.

`refrain.model.align.plots` scores a query against the C candidates verification
shortlists (100 by default). Pair by pair, each of its stages is a few small numpy calls
per candidate (the best key's profile fit, the delay embedding and unit norm of the
reference's states, one matrix product, a partition along each axis for the mutual
neighbours), and at 100 candidates their fixed costs outweigh the arithmetic. Here the
references are laid side by side, zero-padded to the longest (C, L, 12), and each stage is
one call over all of them:

- `best_keys`: the local OTI of every pair (`align.local_oti`), one cumulative sum and one
  product over every window of every reference;
- `states`: the unit-norm delay-embedded states of every reference;
- `neighbour_plots`: per transposition the query takes, one product with the states of
  the references aligned in it, then the mutual-neighbour plots of those references: the
  k-th largest similarity of each query frame's row (k depends on the reference's length:
  padding holds -inf, below every real similarity) and of each reference frame's column,
  by two partitions.

Every value is the pairwise path's, element for element: the same float32 operations on the
same operands in the same order (tests/test_verify_speed.py). A line whose k-th value is
tied, so that more than k frames reach it (silence), needs the pairwise tie-break
(`qmax.mutual_neighbours`), as does a reference too short to have k neighbours: those
references' plots are recomputed pair by pair.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .qmax import _unit, available_cpus, mutual_neighbours, one_blas_thread

BINS = 12
_MIN_CHUNK_CELLS = 200_000  # reference frames x query frames worth a thread of their own
_threads: int | None = None  # threads per shortlist (None: `threads` decides)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def set_threads(threads: int | None) -> None:
    """Threads that align one shortlist (None: `threads`' default; 1: the calling thread
    alone)."""
    global _threads, _pool
    if threads is not None and threads < 1:
        raise ValueError(f"expected threads >= 1 or None, got {threads!r}")
    with _pool_lock:
        _threads = threads
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None


def threads() -> int:
    """Threads a shortlist is split over: as set (`set_threads`), or by default one, and one
    more per CPU left idle over the last minute (the load average; at most 4 in all). Split
    over cores that other work holds, a shortlist took longer than in one thread (100
    references, a 60-frame query, on 2 CPUs at a load of 5: 193 ms in two threads against
    170 ms in one)."""
    if _threads is not None:
        return _threads
    cpus = min(4, available_cpus())
    try:
        spare = cpus - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return 1
    return max(1, min(cpus, 1 + math.floor(spare - 0.5)))


def _executor() -> ThreadPoolExecutor:
    """The shared pool, sized for the most threads `threads` can ask for (not for the load
    of the moment, which changes from one shortlist to the next)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            most = _threads if _threads is not None else min(4, available_cpus())
            _pool = ThreadPoolExecutor(max(1, most), thread_name_prefix="refrain-align")
        return _pool


def run_chunks(work: Callable[[int, int], None], widths: np.ndarray, rows: int) -> None:
    """`work(lo, hi)` over consecutive ranges of the references, of about equal frames:
    in the calling thread, or with a shortlist large enough, one range per thread
    (`threads`). Every stage of a range is numpy calls on arrays of thousands of elements,
    which release the GIL, with one BLAS thread each (`qmax.one_blas_thread`)."""
    count = len(widths)
    parts = max(1, min(threads(), count, int(widths.sum()) * rows // _MIN_CHUNK_CELLS))
    if parts == 1:
        work(0, count)
        return
    cum = np.cumsum(widths)
    bounds = [0, *np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts).tolist(), count]
    ranges = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]

    def limited(lo: int, hi: int) -> None:
        with one_blas_thread():
            work(lo, hi)

    pool = _executor()
    futures = [pool.submit(limited, lo, hi) for lo, hi in ranges[1:]]
    work(*ranges[0])  # the calling thread takes the first range
    for f in futures:
        f.result()


def padded(refs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """References (m_c, 12) -> (C, L, 12) float32 zero-padded to the longest, and (C,) m_c."""
    widths = np.array([len(r) for r in refs], dtype=np.int64)
    out = np.zeros((len(refs), int(widths.max(initial=0)), BINS), dtype=np.float32)
    for c, r in enumerate(refs):
        out[c, : len(r)] = r
    return out, widths


def rolled_profiles(query: np.ndarray) -> np.ndarray:
    """(12, 12): the query's global chroma profile rolled by 0..11."""
    profile = _unit(query.mean(0))
    return np.stack([np.roll(profile, k) for k in range(BINS)])


def best_keys(query: np.ndarray, refs: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """(C,) `align.local_oti` of the query against each padded reference: the transposition
    whose rolled query profile best matches (cosine) the profile of some stretch of the
    reference as long as the query (the whole reference where it is shorter)."""
    n = len(query)
    rolled = rolled_profiles(query)
    fit = np.full((len(refs), BINS), -np.inf, dtype=np.float32)
    cum = np.concatenate(
        [np.zeros((len(refs), 1, BINS), np.float32), np.cumsum(refs, axis=1)], axis=1
    )
    long = np.flatnonzero(widths >= n)
    if len(long) and refs.shape[1] >= n:
        windows = _unit(cum[long, n:] - cum[long, :-n])  # (G, L - n + 1, 12)
        # one product per reference, over its own windows: the pairwise path's operands, so
        # the same bits (equal fits, of a symmetric profile, must stay equal for argmax)
        for g, c in enumerate(long.tolist()):
            fit[c] = (windows[g, : widths[c] - n + 1] @ rolled.T).max(0)
    for short in np.flatnonzero(widths < n).tolist():  # one window: the whole reference
        m = int(widths[short])
        whole = _unit(cum[short, m : m + 1] - cum[short, :1])
        fit[short] = (whole @ rolled.T).max(0)
    return np.argmax(fit, axis=1).astype(np.int64)


def delay_states(x: np.ndarray, m: int, tau: int) -> np.ndarray:
    """`qmax.delay_embed` and unit norm of frames (..., L, 12) along their second-last
    axis: (..., L, 12 * m), the first frame repeated before the start."""
    length, d = x.shape[-2:]
    out = np.empty((*x.shape[:-2], length, m, d), dtype=x.dtype)
    for k in range(m):
        s = min(k * tau, length)
        out[..., s:, k, :] = x[..., : length - s, :]
        if s:
            out[..., :s, k, :] = x[..., :1, :]
    return _unit(out.reshape(*x.shape[:-2], length, m * d))


def neighbour_plots(
    rolled: dict[int, np.ndarray],
    states: np.ndarray,
    widths: np.ndarray,
    shifts: np.ndarray,
    kappa: float,
) -> np.ndarray:
    """(C, n, L) bool: `qmax.cross_recurrence` of the query states rolled by `shifts[c]`
    (`rolled[k]`: (n, D) unit states in transposition k) against each reference's unit
    states (`states`: (C, L, D), zero past `widths[c]`), False past each reference's end.

    The products stay one per pair, the pairwise path's: a matrix product's last bits
    depend on where an element falls in the product (BLAS kernels differ at the edges), and
    equal similarities (a held chord) must stay equal for the tie-break."""
    n = len(next(iter(rolled.values())))
    count, length, _ = states.shape
    sim = np.full((count, n, length), -np.inf, dtype=np.float32)  # padding: below any
    for c, w in enumerate(widths.tolist()):
        sim[c, :, :w] = rolled[int(shifts[c])] @ states[c, :w].T
    return _mutual(sim, widths, kappa)


def _mutual(sim: np.ndarray, widths: np.ndarray, kappa: float) -> np.ndarray:
    """Mutual-neighbour plots (C, n, L) of similarities (C, n, L), -inf past `widths`."""
    _, n, length = sim.shape
    valid = np.arange(length)[None, :] < widths[:, None]  # (C, L)
    k_row = np.maximum(1, np.ceil(kappa * widths).astype(np.int64))
    k_col = max(1, math.ceil(kappa * n))
    kth = length - k_row
    rows = np.take_along_axis(
        np.partition(sim, np.unique(kth), axis=-1), kth[:, None, None], axis=-1
    )  # (C, n, 1): each query frame's k-th largest similarity in each reference
    cols = np.partition(sim, n - k_col, axis=1)[:, n - k_col : n - k_col + 1]  # (C, 1, L)
    on_row = sim >= rows
    on_col = sim >= cols
    rec = on_row & on_col
    # ties at a threshold (more than k reach it), or fewer frames than k: pairwise
    redo = (on_row.sum(-1) > k_row[:, None]).any(1) | (k_row >= widths) | (k_col >= n)
    redo |= ((on_col.sum(1) > k_col) & valid).any(1)
    for c in np.flatnonzero(redo):
        w = int(widths[c])
        rec[c] = False
        rec[c, :, :w] = mutual_neighbours(sim[c, :, :w], kappa)
    return rec
