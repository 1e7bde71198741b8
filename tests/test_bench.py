"""bench/search.py on a few hundred tracks: its ground truth is `exhaustive_rank`'s, and the
served path over an exact (Flat) index returns the exhaustive top 10 when it gathers enough
neighbours per query segment, with and without alignment verification."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "bench" / "search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_search_bench_flat_is_exact(tmp_path):
    bench = load_bench()
    rows = bench.main(
        [
            "--tracks",
            "200",
            "--factories",
            "Flat",
            "--reducer",
            "64:100",
            "512:20",
            "512:100:20",
            "512:100:5",
            "--queries",
            "20",
            "--recall-queries",
            "20",
            "--verify",
            "3",
            "--zdim",
            "32",
            "--workdir",
            str(tmp_path),
            "--disk-probe",
            "0",
        ]
    )  # raises SystemExit if the ground truth disagrees with exhaustive_rank
    col = {name: i for i, name in enumerate(bench.HEADER)}
    got = {(r[col["data"]], r[col["k:cand"]]): r for r in rows}
    reducers = ("64:100", "512:20", "512:100:20", "512:100:5")
    assert set(got) == {(d, rc) for d in ("clustered", "random") for rc in reducers}
    for (data, reducer), r in got.items():
        assert float(r[col["hit@1"]]) == 1.0
        # random segments are independent: 64 neighbours per segment reach 10 tracks; a
        # clustered track's 40 segments crowd each other into the 64, so it needs more. With
        # verification the exact search's 20 (or 5) nearest are verified, and the served top
        # 10 is theirs (then the rest by distance): the exhaustive pipeline's top 10.
        if data == "random" or reducer != "64:100":
            assert float(r[col["recall@10"]]) == 1.0, r
        if reducer.count(":") == 2:
            assert float(r[col["verify ms"]]) > 0, r


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_embedding_statistics_recover_the_parts_and_drive_the_model_dataset(tmp_path):
    """Works, versions and segments drawn with known covariances: `decompose` recovers each
    part's variance and spread, and bench/search.py's "model" data reproduce them."""
    import numpy as np

    stats_mod = load_script("embedding_stats")
    rng = np.random.default_rng(0)
    zdim = 16
    scales = {
        "work": np.r_[np.full(2, 3.0), np.full(zdim - 2, 0.1)],  # 2 strong directions
        "version": np.full(zdim, 0.5),
        "segment": np.full(zdim, 1.0),
    }
    tracks = {}
    for w in range(2000):
        centre = scales["work"] * rng.standard_normal(zdim)
        tracks[f"w{w}"] = [
            centre
            + scales["version"] * rng.standard_normal(zdim)
            + scales["segment"] * rng.standard_normal((8, zdim))
            for _ in range(4)
        ]
    stats = stats_mod.decompose(tracks)
    var = {p: (s**2).sum() for p, s in scales.items()}
    # each part is estimated from means over 4 versions x 8 segments, which carry the
    # finer parts' variance along
    want = {
        "work": var["work"] + var["version"] / 4 + var["segment"] / 32,
        "version": (var["version"] + var["segment"] / 8) * 3 / 4,
        "segment": var["segment"] * 7 / 8,
    }
    for part, v in want.items():
        assert stats[f"{part}_spectrum"].sum() == pytest.approx(v, rel=0.1)
    assert stats_mod.participation_ratio(stats["work_spectrum"]) < 3
    assert stats_mod.participation_ratio(stats["segment_spectrum"]) > 12
    path = tmp_path / "stats.npz"
    np.savez(path, **stats)

    bench = load_bench()
    ds = bench.Dataset("model", 400, zdim, "float32", stats=path)
    x = ds.batch(0)  # (tracks, segments, zdim)
    assert x.shape == (400, bench.SEGMENTS, zdim)
    own = x.mean(axis=1, keepdims=True)
    assert ((x - own) ** 2).sum(-1).mean() == pytest.approx(
        stats["segment_spectrum"].sum() * (1 - 1 / bench.SEGMENTS), rel=0.1
    )
    queries, sources = ds.queries(20)
    assert queries.shape == (20, bench.QUERY_SEGMENTS, zdim) and len(set(sources)) == 20
    with pytest.raises(SystemExit, match="zdim"):
        bench.Dataset("model", 10, zdim * 2, "float32", stats=path)
