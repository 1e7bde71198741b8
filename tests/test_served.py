"""The served search against the exhaustive evaluator: `refrain evaluate --served`.

A small seeded catalog of synthetic songs (each work: the song, a transposed version and a
faster one) goes through both paths with the shipped model and the service's default
settings; the served MAP must match the evaluator's at every level, with verification off
and on. The candidate generation behind it is checked on random vectors against
`exhaustive_rank`: every track ranked, in the exact order, whatever `k`.
"""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from refrain.index import TrackRecord, open_index
from refrain.model import load_model
from refrain.search.ranking import QuerySegments, SearchOptions, exhaustive_rank, rank_tracks
from refrain.service.settings import Settings
from refrain.training.evaluate import EvalOptions, evaluate_detailed, read_manifest
from refrain.training.served import evaluate_served, level_labels

from helpers import pitch_shift, synth_song, time_stretch

SR = 16000
WORKS = 4
TOLERANCE = 0.01  # MAP


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    rows = ["clique,path"]
    for w in range(WORKS):
        # every version 40 s or longer: the service ranks whole tracks with `bpwr-10` from
        # 40 s (`min` below), the evaluator's track level always does
        song = synth_song(46.0, seed=100 + w, sr=SR)
        versions = {
            "a": song,
            "b": pitch_shift(song, 2 - w % 3, sr=SR),  # -0 .. +2 semitones
            "c": time_stretch(song, 1.1, sr=SR),  # 42 s
        }
        for name, x in versions.items():
            path = root / f"w{w}{name}.flac"
            sf.write(path, x[:, 0], SR)
            rows.append(f"w{w},{path.name}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def both(catalog):
    model = load_model()
    items = read_manifest(catalog)
    opts = EvalOptions(query_seconds=(5.0, 10.0, 30.0), verify=100)
    exhaustive = evaluate_detailed(model, items, opts)
    served = evaluate_served(model, items, opts, settings=Settings(_env_file=None))
    return opts, exhaustive, served


@pytest.mark.parametrize("verify", [False, True], ids=["segments", "verified"])
def test_served_map_matches_the_evaluator_at_every_level(both, verify):
    opts, exhaustive, served = both
    suffix = " +verify" if verify else ""
    evaluated = [opts.track_label] + [opts.segment_label(t) for t in opts.query_seconds]
    for mine, theirs in zip(level_labels(opts), evaluated, strict=True):
        got = served.results[mine + suffix]
        want = exhaustive.results[theirs + suffix]
        assert got.n_queries == want.n_queries
        assert abs(got.map.mean - want.map.mean) <= TOLERANCE, (mine + suffix, got, want)


def test_served_ranks_the_whole_catalog(both):
    _, exhaustive, served = both
    assert served.settings["top_k"] == exhaustive.n_tracks - 1
    assert all(n == 0 for n in served.unranked.values()), served.unranked


def test_served_levels_follow_the_evaluators_order(both):
    opts, _, served = both
    names = level_labels(opts)
    assert list(served.results) == names + [f"{n} +verify" for n in names]
    assert np.isfinite([r.map.mean for r in served.results.values()]).all()


# -- candidate generation ----------------------------------------------------------------------

ZDIM = 16
IDENTITY = {
    "weights_sha256": "cd" * 32,
    "zdim": ZDIM,
    "shingle_len_s": 20.0,
    "hop_s": 5.0,
    "sample_rate": 16000,
}


@pytest.fixture
def random_index(tmp_path):
    rng = np.random.default_rng(5)
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        for i in range(40):
            n = int(rng.integers(1, 12))
            record = TrackRecord(f"t{i:03d}", duration_s=20.0 + 5 * (n - 1), content_sha256=str(i))
            ix.add_track(
                record, rng.standard_normal((n, ZDIM)).astype(np.float32), 5.0 * np.arange(n)
            )
        yield ix, rng


@pytest.mark.parametrize("rows, reduction", [(1, "min"), (3, "min"), (12, "bpwr-10")])
def test_a_long_list_ranks_every_track_in_the_exact_order(random_index, rows, reduction):
    """k = 2 neighbours per row hold a few tracks; the search widens its kNN until it has
    every track the list asks for, and (exact candidates) orders them as the exhaustive
    comparison does."""
    ix, rng = random_index
    vectors = rng.standard_normal((rows, ZDIM)).astype(np.float32)
    query = QuerySegments(vectors, 5.0 * np.arange(rows), 20.0, 15.0 + 5 * rows)
    opts = SearchOptions(top_k=40, k=2, candidates=40, reduction=reduction)
    hits = rank_tracks(ix, query, opts)
    exact = exhaustive_rank(ix, query, reduction, 40)
    assert [h.track.track_id for h in hits] == [t for t, _ in exact]


def test_bpwr_candidates_follow_the_reduction_not_one_close_segment(random_index):
    """With one candidate, a track matching every query segment fairly well is kept over a
    decoy matching one segment almost exactly and the rest badly: the candidates are placed
    by the query's reduction (`bpwr-10`), not by their single closest segment."""
    ix, rng = random_index
    query_vectors = rng.standard_normal((12, ZDIM)).astype(np.float32)
    near = query_vectors + 0.5 * rng.standard_normal((12, ZDIM)).astype(np.float32)
    decoy = 3 * rng.standard_normal((12, ZDIM)).astype(np.float32)
    decoy[0] = query_vectors[0] + 0.01
    for tid, vectors in (("target", near), ("decoy", decoy)):
        record = TrackRecord(tid, duration_s=75.0, content_sha256=tid)
        ix.add_track(record, vectors, 5.0 * np.arange(12))
    query = QuerySegments(query_vectors, 5.0 * np.arange(12), 20.0, 75.0)
    assert exhaustive_rank(ix, query, "bpwr-10", 1)[0][0] == "target"
    assert exhaustive_rank(ix, query, "min", 1)[0][0] == "decoy"
    hits = rank_tracks(ix, query, SearchOptions(top_k=1, candidates=1, reduction="bpwr-10"))
    assert hits[0].track.track_id == "target"
