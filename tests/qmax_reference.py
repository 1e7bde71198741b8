"""The specification of verification's alignment: `align.plots` and `align._fill` as they were
before the shortlist was batched (`refrain.model.shortlist`), pair by pair in plain numpy.

tests/test_verify_speed.py requires the batched path to equal it cell for cell;
bench/search.py serves its ":before" rows with it (`search_measure.previous_alignment`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refrain.model import align, shortlist
from refrain.model.qmax import QmaxParams, _unit, cross_recurrence, delay_embed


def reference_fill(
    rec: np.ndarray, score: np.ndarray, sep: np.ndarray, gap_onset: float, gap_extend: float
) -> np.ndarray:
    """The Qmax recursion of a padded plot row by row in numpy, the linked cells' extension
    added through a mask."""
    pen = np.where(rec, np.float32(gap_onset), np.float32(gap_extend))
    dec = np.empty(rec.shape, np.float32)
    np.subtract(score[:2], pen[:2], out=dec[:2])
    cut = np.flatnonzero(sep[2:]) + 2  # separator columns after the first two: zero in every row
    best = np.empty(rec.shape[1] - 2, np.float32)
    for i in range(2, rec.shape[0]):
        row = score[i, 2:]
        np.maximum(score[i - 1, 1:-1], score[i - 1, :-2], out=best)
        np.maximum(best, score[i - 2, 1:-1], out=best)
        np.maximum(dec[i - 1, 1:-1], dec[i - 1, :-2], out=row)
        np.maximum(row, dec[i - 2, 1:-1], out=row)
        np.maximum(row, 0, out=row)
        np.add(best, 1, out=row, where=rec[i, 2:])
        score[i, cut] = 0
        np.subtract(score[i], pen[i], out=dec[i])
    return score


def reference_plots(
    query: np.ndarray,
    refs: Sequence[np.ndarray],
    params: QmaxParams | None = None,
    shifts: np.ndarray | None = None,
) -> align.Plots:
    """`align.plots` pair by pair, as it was: each reference's local OTI (unless `shifts` are
    given), states and plot, then the recursion over all of them side by side."""
    p = params or QmaxParams()
    query = np.asarray(query, dtype=np.float32)
    refs = [np.asarray(r, dtype=np.float32) for r in refs]
    if len(refs) == 0:
        empty = np.zeros((len(query) + 2, 0))
        starts, widths, shifts = (np.zeros(0, np.int64) for _ in range(3))
        return align.Plots(empty, empty.astype(bool), starts, widths, shifts, p, query)
    if shifts is None:  # each pair's local OTI (`align.local_oti`), the profiles rolled once
        profiles = shortlist.rolled_profiles(query)
        shifts = np.array([np.argmax(align._key_fit(query, r, profiles)) for r in refs], np.int64)
    rolled = {
        int(k): _unit(delay_embed(np.roll(query, k, axis=1), p.m, p.tau)) for k in np.unique(shifts)
    }
    widths = np.array([len(r) for r in refs], dtype=np.int64)
    starts = 2 + np.concatenate([[0], np.cumsum(widths + 2)[:-1]])
    rec = np.zeros((len(query) + 2, int(starts[-1] + widths[-1])), dtype=bool)
    sep = np.ones(rec.shape[1], dtype=bool)
    ref_states: dict[int, np.ndarray] = {}
    for c, r in enumerate(refs):
        states = ref_states.setdefault(id(r), _unit(delay_embed(r, p.m, p.tau)))
        a = starts[c]
        rec[2:, a : a + len(r)] = cross_recurrence(rolled[int(shifts[c])], states, p.kappa)
        sep[a : a + len(r)] = False
    score = reference_fill(rec, np.zeros(rec.shape, np.float32), sep, p.gap_onset, p.gap_extend)
    return align.Plots(score, rec, starts, widths, shifts, p, query)
