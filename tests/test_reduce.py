import itertools
import math

import numpy as np
import pytest
import torch

from refrain.model.reduce import (
    Reduction,
    ReductionKind,
    best_pairs,
    best_pairs_batch,
    nsqeuc,
    reduce,
    track_distance,
)

TOL = 1e-6
SHAPES = [(3, 7), (7, 3), (5, 5), (1, 6), (6, 1), (1, 1), (12, 10)]
MASKINGS = ["none", "padding", "random"]
NAMES = [
    "min", "max", "mean", "minmean", "meanmin",
    "bpwr", "bpwr-1", "bpwr-3", "bpwr-10",
    "best", "best-4", "best-100", "bestmin", "bestmin-2", "bestmin-50",
]  # fmt: skip
ALL_NAMES = NAMES + ["s" + name for name in NAMES]


# Literal definitions over one matrix, with plain Python loops.


def literal(dist: np.ndarray, mask: np.ndarray | None, name: str) -> float:
    red = Reduction.parse(name)
    d = dist.tolist()
    s1, s2 = dist.shape
    ok = [[mask is None or not mask[i][j] for j in range(s2)] for i in range(s1)]
    value = _literal_one(d, ok, s1, s2, red.kind, red.k)
    if red.symmetric:
        dt = [[d[i][j] for i in range(s1)] for j in range(s2)]
        okt = [[ok[i][j] for i in range(s1)] for j in range(s2)]
        value = 0.5 * (value + _literal_one(dt, okt, s2, s1, red.kind, red.k))
    return value


def _mean(values):
    return sum(values) / len(values) if values else math.inf


def _literal_one(d, ok, s1, s2, kind, k):
    entries = [(d[i][j], i, j) for i in range(s1) for j in range(s2) if ok[i][j]]
    values = [v for v, _, _ in entries]
    rows = [[d[i][j] for j in range(s2) if ok[i][j]] for i in range(s1)]
    rows = [row for row in rows if row]
    if kind is ReductionKind.MIN:
        return min(values, default=math.inf)
    if kind is ReductionKind.MAX:
        return max(values, default=-math.inf)
    if kind is ReductionKind.MEAN:
        return _mean(values)
    if kind is ReductionKind.MINMEAN:
        return min((_mean(row) for row in rows), default=math.inf)
    if kind is ReductionKind.MEANMIN:
        return _mean([min(row) for row in rows])
    if kind is ReductionKind.BEST:
        return _mean(sorted(values)[: k or 1])
    if kind is ReductionKind.BESTMIN:
        return _mean(sorted(min(row) for row in rows)[: k or 1])
    if kind is ReductionKind.BPWR:
        return _mean([d[i][j] for i, j in _literal_pairs(d, ok, s1, s2, k)])
    raise AssertionError(kind)


def _literal_pairs(d, ok, s1, s2, k):
    n = min(k or s1, s1, s2)
    used_rows, used_cols, chosen = set(), set(), []
    for _ in range(n):
        left = [
            (d[i][j], i, j)
            for i in range(s1)
            for j in range(s2)
            if ok[i][j] and i not in used_rows and j not in used_cols
        ]
        if not left:
            break
        _, i, j = min(left)  # ties: lowest row, then lowest column
        chosen.append((i, j))
        used_rows.add(i)
        used_cols.add(j)
    return chosen


# The reference algorithm (distance_tensor_redux), restated for one batch of matrices.


def reference_redux(dist, mask, name):
    big = 1e12

    def rmin(x, m, dims):
        return torch.where(m, big, x).amin(dims, keepdim=True)

    def rmean(x, m, dims):
        inc = (~m).to(x.dtype)
        return (inc * x).sum(dims, keepdim=True) / inc.sum(dims, keepdim=True).clamp(min=1e-7)

    if name == "min":
        out = rmin(dist, mask, (-1, -2))
    elif name == "mean":
        out = rmean(dist, mask, (-1, -2))
    elif name == "minmean":
        out = rmin(rmean(dist, mask, -1), mask, (-1, -2))
    elif name == "meanmin":
        out = rmean(rmin(dist, mask, -1), mask, (-1, -2))
    elif name.startswith("best"):
        k = int(name.split("-")[1]) if "-" in name else 1
        flat = torch.where(mask, big, dist).flatten(-2)
        top = flat.topk(min(k, flat.shape[-1]), dim=-1, largest=False).values
        out = rmean(top, top >= big, -1)
    elif name.startswith("bpwr"):
        if dist.shape[-1] < dist.shape[-2]:
            dist, mask = dist.transpose(-1, -2), mask.transpose(-1, -2)
        n = dist.shape[-2]
        if "-" in name:
            n = max(1, min(int(name.split("-")[1]), n))
        selected = torch.zeros_like(mask)
        for step in range(n):
            low = rmin(dist, mask, (-1, -2))
            pick = (dist <= low) & ~mask
            selected = selected | pick
            if step < n - 1:
                mask = mask | (rmin(dist, mask, -1) <= low) | (rmin(dist, mask, -2) <= low)
        out = rmean(dist, ~selected, (-1, -2))
    else:
        raise AssertionError(name)
    return out.squeeze(-1).squeeze(-1)


# Helpers building inputs.


def padding_mask(rng, b1, b2, s1, s2):
    """Mask of trailing padded rows (query segments) and columns (candidate segments)."""
    len1 = rng.integers(1, s1 + 1, size=b1)
    len2 = rng.integers(1, s2 + 1, size=b2)
    rows = np.arange(s1)[None, None, :, None] >= len1[:, None, None, None]
    cols = np.arange(s2)[None, None, None, :] >= len2[None, :, None, None]
    return rows | cols


def random_mask(rng, shape, p=0.35):
    return rng.random(shape) < p


def check_batched(dist, mask, name):
    got = reduce(torch.from_numpy(dist), name, None if mask is None else torch.from_numpy(mask))
    assert got.shape == dist.shape[:-2]
    for idx in itertools.product(*(range(n) for n in dist.shape[:-2])):
        want = literal(dist[idx], None if mask is None else mask[idx], name)
        if math.isinf(want):
            assert got[idx].item() == want, (name, idx)
        else:
            assert got[idx].item() == pytest.approx(want, abs=TOL), (name, idx)


# Vectorised reduce against the literal definitions.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masking", MASKINGS)
def test_reduce_matches_literal(shape, masking):
    rng = np.random.default_rng([SHAPES.index(shape), MASKINGS.index(masking)])
    b1, b2 = 3, 2
    dist = rng.random((b1, b2, *shape))
    mask = {
        "none": None,
        "padding": padding_mask(rng, b1, b2, *shape),
        "random": random_mask(rng, (b1, b2, *shape)),
    }[masking]
    for name in ALL_NAMES:
        check_batched(dist, mask, name)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reduce_single_matrix_float32_and_numpy(name):
    rng = np.random.default_rng(7)
    dist = rng.random((4, 6)).astype(np.float32)
    mask = random_mask(rng, dist.shape)
    mask[0, 0] = False
    got = reduce(dist, name, mask)
    assert isinstance(got, np.ndarray) and got.shape == ()
    assert float(got) == pytest.approx(literal(dist.astype(np.float64), mask, name), abs=TOL)


def test_reduce_with_ties_is_deterministic_and_literal():
    rng = np.random.default_rng(3)
    dist = rng.integers(0, 3, size=(4, 3, 5, 6)).astype(np.float64)
    mask = random_mask(rng, dist.shape, p=0.2)
    for name in ALL_NAMES:
        check_batched(dist, mask, name)
        first = reduce(torch.from_numpy(dist), name, torch.from_numpy(mask))
        again = reduce(torch.from_numpy(dist), name, torch.from_numpy(mask))
        assert torch.equal(first, again)


def test_broadcast_mask():
    rng = np.random.default_rng(11)
    dist = torch.from_numpy(rng.random((2, 3, 4, 5)))
    qmask = torch.tensor([[False, False, True, True], [False, False, False, True]])
    cmask = torch.tensor([[False] * 5, [False, False, False, True, True], [False] + [True] * 4])
    small = qmask[:, None, :, None] | cmask[None, :, None, :]
    full = small.expand(2, 3, 4, 5)
    for name in ("bpwr-3", "meanmin", "sbest-2"):
        assert torch.equal(reduce(dist, name, small), reduce(dist, name, full))


# Agreement with the reference on tie-free matrices.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masking", MASKINGS)
def test_reduce_matches_reference_algorithm(shape, masking):
    rng = np.random.default_rng([1000, SHAPES.index(shape), MASKINGS.index(masking)])
    b1, b2 = 4, 3
    dist = torch.from_numpy(rng.random((b1, b2, *shape)))
    mask = {
        "none": np.zeros((b1, b2, *shape), dtype=bool),
        "padding": padding_mask(rng, b1, b2, *shape),
        "random": random_mask(rng, (b1, b2, *shape)),
    }[masking]
    mask[..., 0, 0] = False  # the reference returns fill values when nothing is valid
    mask = torch.from_numpy(mask)
    names = ["min", "mean", "minmean", "bpwr", "bpwr-1", "bpwr-3", "best", "best-4"]
    if masking != "random":  # the reference weights rows of meanmin by their valid count
        names.append("meanmin")
    for name in names:
        want = reference_redux(dist, mask, name)
        got = reduce(dist, name, mask)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=name)


def test_meanmin_with_uneven_rows_is_plain_mean_of_row_minima():
    dist = torch.tensor([[1.0, 5.0, 5.0], [3.0, 5.0, 5.0]])
    mask = torch.tensor([[False, False, False], [False, True, True]])
    assert reduce(dist, "meanmin", mask).item() == pytest.approx(2.0)
    # The reference weights rows by valid entries: (3 * 1 + 1 * 3) / 4.
    assert reference_redux(dist, mask, "meanmin").item() == pytest.approx(1.5)


# Crafted cases.


def test_bpwr_ties_choose_lowest_flat_index():
    dist = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    assert best_pairs(dist) == [(0, 0), (1, 1)]
    assert reduce(dist, "bpwr").item() == pytest.approx(2.5)
    # Transposed it is the same matrix, so the symmetric variant agrees.
    assert reduce(dist, "sbpwr").item() == pytest.approx(2.5)


def test_bpwr_is_greedy_not_optimal_assignment():
    dist = torch.tensor([[1.0, 2.0], [2.0, 100.0]])
    assert best_pairs(dist) == [(0, 0), (1, 1)]
    assert reduce(dist, "bpwr").item() == pytest.approx(50.5)
    assert reduce(dist, "bpwr-1").item() == pytest.approx(1.0)


def test_best_pairs_with_mask_and_short_supply():
    dist = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.05, 0.8], [0.7, 0.6, 0.4]])
    assert best_pairs(dist) == [(1, 1), (0, 0), (2, 2)]
    assert best_pairs(dist, 2) == [(1, 1), (0, 0)]
    mask = torch.tensor([[False, True, True], [False, True, True], [True, True, True]])
    assert best_pairs(dist, 3, mask) == [(0, 0)]
    assert best_pairs(dist.numpy(), 1) == [(1, 1)]
    with pytest.raises(ValueError, match="one"):
        best_pairs(dist[None])
    with pytest.raises(ValueError, match="n must"):
        best_pairs(dist, 0)


def test_bestmin_differs_from_best():
    dist = torch.tensor([[1.0, 1.1], [5.0, 9.0]])
    assert reduce(dist, "best-2").item() == pytest.approx(1.05)
    assert reduce(dist, "bestmin-2").item() == pytest.approx(3.0)
    assert reduce(dist, "bestmin").item() == pytest.approx(1.0)


def test_symmetric_averages_both_directions():
    dist = torch.tensor([[0.0, 4.0, 4.0], [2.0, 6.0, 8.0]])
    # meanmin: rows -> (0 + 2) / 2 = 1; columns -> (0 + 4 + 4) / 3.
    assert reduce(dist, "meanmin").item() == pytest.approx(1.0)
    assert reduce(dist, "smeanmin").item() == pytest.approx(0.5 * (1.0 + 8.0 / 3.0))
    assert reduce(dist, "smin").item() == reduce(dist, "min").item()


def test_no_valid_entry():
    dist = torch.rand(2, 3, 4)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 0, 0] = False
    for name in ALL_NAMES:
        got = reduce(dist, name, mask)
        want = -math.inf if name in ("max", "smax") else math.inf
        assert got[0].item() == want, name
        assert got[1].item() == pytest.approx(dist[1, 0, 0].item()), name


def test_gradient_flows_to_selected_pairs():
    dist = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.05, 0.8]], requires_grad=True)
    reduce(dist, "bpwr-2").backward()
    want = torch.zeros(2, 3)
    want[1, 1] = want[0, 0] = 0.5
    torch.testing.assert_close(dist.grad, want)


def test_reduce_rejects_bad_input():
    with pytest.raises(ValueError, match="S1, S2"):
        reduce(torch.rand(5), "min")
    with pytest.raises(ValueError, match="S1, S2"):
        reduce(torch.rand(2, 0, 3), "min")
    with pytest.raises(ValueError, match="boolean"):
        reduce(torch.rand(2, 3), "min", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="broadcast"):
        reduce(torch.rand(2, 3), "min", torch.zeros(3, 2, dtype=torch.bool))


# Parsing.


@pytest.mark.parametrize("name", ALL_NAMES)
def test_parse_round_trip(name):
    red = Reduction.parse(name)
    assert str(red) == name
    assert Reduction.parse(str(red)) == red
    assert red.symmetric == name.startswith("s")


def test_parse_fields():
    assert Reduction.parse("sbpwr-10") == Reduction(ReductionKind.BPWR, 10, symmetric=True)
    assert Reduction.parse("bestmin") == Reduction(ReductionKind.BESTMIN)
    assert Reduction.parse("minmean").kind is ReductionKind.MINMEAN


@pytest.mark.parametrize(
    "text",
    ["", "s", "ss", "foo", "smoo", "ssmin", "bpwr-0", "bpwr--1", "bpwr-1.5", "bpwr-",
     "bpwr-x", "bpwr-+5", "bpwr- 5", "min-3", "mean-2", "BPWR-10", " min", "randmin", "worst"],
)  # fmt: skip
def test_parse_errors(text):
    with pytest.raises(ValueError, match=r"reduction|k must") as info:
        Reduction.parse(text)
    if "-" not in text:
        assert "bpwr" in str(info.value) and "meanmin" in str(info.value)


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="k must"):
        Reduction(ReductionKind.BEST, 0)
    with pytest.raises(ValueError, match="takes no k"):
        Reduction(ReductionKind.MIN, 2)
    with pytest.raises(TypeError, match="ReductionKind"):
        Reduction("min")


# Segment distances and track distances.


def test_nsqeuc_matches_brute_force():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2, 4, 7))
    b = rng.normal(size=(2, 3, 7))
    got = nsqeuc(a, b)
    assert isinstance(got, np.ndarray) and got.shape == (2, 4, 3)
    for n in range(2):
        for i in range(4):
            for j in range(3):
                want = sum((a[n, i, d] - b[n, j, d]) ** 2 for d in range(7)) / 7
                assert got[n, i, j] == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(
        nsqeuc(torch.from_numpy(a), torch.from_numpy(b)), torch.from_numpy(got)
    )


def test_nsqeuc_is_never_negative():
    x = torch.randn(50, 128, dtype=torch.float32) * 30
    d = nsqeuc(x, x)
    assert (d >= 0).all()
    assert d.diagonal().abs().max() < 1e-2
    with pytest.raises(ValueError, match="D"):
        nsqeuc(torch.rand(3, 4), torch.rand(3, 5))


@pytest.mark.parametrize("name", ["bpwr-10", "min", "meanmin", "sbest-3", "bestmin-2"])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_track_distance_equals_reduction_of_unpadded_tracks(name, chunk):
    rng = np.random.default_rng(9)
    bq, bc, sq, sc, dim = 3, 7, 5, 6, 16
    q = torch.from_numpy(rng.normal(size=(bq, sq, dim)))
    c = torch.from_numpy(rng.normal(size=(bc, sc, dim)))
    qlen = rng.integers(1, sq + 1, size=bq)
    clen = rng.integers(1, sc + 1, size=bc)
    qmask = torch.from_numpy(np.arange(sq)[None] >= qlen[:, None])
    cmask = torch.from_numpy(np.arange(sc)[None] >= clen[:, None])
    got = track_distance(q, c, name, qmask, cmask, chunk=chunk)
    assert got.shape == (bq, bc)
    for i in range(bq):
        for j in range(bc):
            seg = nsqeuc(q[i, : qlen[i]], c[j, : clen[j]])
            assert got[i, j].item() == pytest.approx(reduce(seg, name).item(), abs=TOL)
    # one-sided masks and no masks
    only_q = track_distance(q, c, name, qmask=qmask, chunk=chunk)
    assert only_q[0, 0].item() == pytest.approx(
        reduce(nsqeuc(q[0, : qlen[0]], c[0]), name).item(), abs=TOL
    )
    plain = track_distance(q, c, name, chunk=chunk)
    assert plain[1, 2].item() == pytest.approx(reduce(nsqeuc(q[1], c[2]), name).item(), abs=TOL)


def test_track_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected q"):
        track_distance(torch.rand(2, 3, 4), torch.rand(2, 3, 5), "min")
    with pytest.raises(ValueError, match="qmask"):
        track_distance(torch.rand(2, 3, 4), torch.rand(2, 3, 4), "min", qmask=torch.ones(2, 4))


def test_best_pairs_batch_equals_best_pairs_one_by_one():
    rng = np.random.default_rng(11)
    mats = [rng.standard_normal((3, n)).astype(np.float32) for n in (1, 2, 5, 40, 7)]
    mats.append(np.round(rng.standard_normal((3, 6)), 0).astype(np.float32))  # ties
    mats.append(np.full((3, 4), 2.0, dtype=np.float32))  # all tied
    for n in (1, 3, 5):
        assert best_pairs_batch(mats, n) == [best_pairs(m, n) for m in mats]
    assert best_pairs_batch([], 3) == []
    with pytest.raises(ValueError):
        best_pairs_batch([mats[0], np.zeros((2, 3), np.float32)], 2)
