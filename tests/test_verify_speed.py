"""The batched verification (`refrain.model.align.plots` over `refrain.model.shortlist`)
against its specification, the pair-by-pair path it replaced: on seeded shortlists the same
keys, plots and Qmax scores, cell for cell, so the verified ranking cannot move."""

from __future__ import annotations

import numpy as np
import pytest

from refrain.model import align
from refrain.model.qmax import QmaxParams
from refrain.model.sequence import UPPER

from qmax_reference import reference_fill, reference_plots


def walk(rng: np.random.Generator, n: int) -> np.ndarray:
    """A quantised chroma sequence that changes slowly, as stored sequences do."""
    x = np.abs(np.cumsum(rng.standard_normal((n, 12)) * 0.4, axis=0)) + rng.random((n, 12))
    return (np.round(x / x.max(1, keepdims=True) * 255) / 255).astype(np.float32)


@pytest.mark.parametrize("params", [QmaxParams(), UPPER])
@pytest.mark.parametrize("seed", range(4))
def test_batched_plots_equal_the_pairwise_specification(seed: int, params: QmaxParams):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([3, 20, 60]))
    refs = [walk(rng, int(rng.integers(2, 300))) for _ in range(40)]
    query = walk(rng, n)
    # versions of the query inside some references, transposed
    for c in rng.choice(len(refs), 5, replace=False):
        at = int(rng.integers(0, len(refs[c]) + 1))
        refs[c] = np.concatenate(
            [refs[c][:at], np.roll(query, int(rng.integers(12)), axis=1), refs[c][at:]]
        )
    refs[7] = np.zeros((30, 12), np.float32)  # silence: ties everywhere
    refs[8] = np.repeat(refs[8][:1], 40, axis=0)  # one frame held: ties along each row
    spec = reference_plots(query, refs, params)
    shifts, rec, score = spec.shifts, spec.recurrence, spec.score
    got = align.plots(query, refs, params)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.recurrence, rec)
    np.testing.assert_array_equal(got.score, score)
    want = [float(score[2:, a : a + w].max()) for a, w in zip(got.starts, got.widths, strict=True)]
    np.testing.assert_array_equal(got.qmax(), want)


def test_fill_equals_the_specification():
    rng = np.random.default_rng(5)
    for _ in range(20):
        rows, cols = int(rng.integers(3, 40)), int(rng.integers(3, 400))
        rec = rng.random((rows, cols)) < rng.uniform(0.02, 0.7)
        sep = rng.random(cols) < 0.05
        sep[:2] = True
        rec[:2] = False
        rec[:, sep] = False
        want = reference_fill(rec, np.zeros(rec.shape, np.float32), sep, 5.0, 0.5)
        got = align._fill(rec, np.zeros(rec.shape, np.float32), sep, 5.0, 0.5)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_split_the_shortlist_without_changing_a_cell(monkeypatch, threads: int):
    from refrain.model import shortlist

    monkeypatch.setattr(shortlist, "_MIN_CHUNK_CELLS", 1)  # split even a small shortlist
    rng = np.random.default_rng(9)
    query = walk(rng, 20)
    refs = [walk(rng, int(rng.integers(2, 120))) for _ in range(11)]
    spec = reference_plots(query, refs, UPPER)
    shifts, rec, score = spec.shifts, spec.recurrence, spec.score
    try:
        shortlist.set_threads(threads)
        got = align.plots(query, refs, UPPER)
    finally:
        shortlist.set_threads(None)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.recurrence, rec)
    np.testing.assert_array_equal(got.score, score)


def test_empty_and_one_reference():
    rng = np.random.default_rng(3)
    query = walk(rng, 12)
    assert len(align.plots(query, []).qmax()) == 0
    ref = walk(rng, 2)
    spec = reference_plots(query, [ref], QmaxParams())
    shifts, score = spec.shifts, spec.score
    got = align.plots(query, [ref])
    np.testing.assert_array_equal(got.score, score)
    np.testing.assert_array_equal(got.shifts, shifts)


def test_equal_key_fits_pick_the_same_key():
    """A flat query profile fits every key alike: the batched path must pick the pairwise
    path's key among the equals, not one that rounding puts ahead."""
    rng = np.random.default_rng(4)
    query = np.full((16, 12), 0.5, np.float32)
    query[::3] = walk(rng, 6)  # some frames move, the profile stays nearly flat
    refs = [walk(rng, int(rng.integers(8, 80))) for _ in range(12)]
    refs.append(np.full((20, 12), 0.5, np.float32))
    spec = reference_plots(query, refs, UPPER)
    shifts, score = spec.shifts, spec.score
    got = align.plots(query, refs, UPPER)
    np.testing.assert_array_equal(got.shifts, shifts)
    np.testing.assert_array_equal(got.score, score)
