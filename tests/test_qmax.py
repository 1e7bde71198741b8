"""The Qmax baseline: OTI, the cross-recurrence plot, the alignment, and `evaluate --baseline qmax`.

Chroma comes from real audio: seeded synthetic songs (tests/helpers.py), transposed and
time-stretched with FFmpeg filters, decoded and transformed as the evaluation does.
"""

import json
import sys

import numpy as np
import pytest
import soundfile as sf

import refrain.model.qmax as qmax_module
from refrain.model.audio import resample
from refrain.model.qmax import (
    QmaxParams,
    QmaxScorer,
    cross_recurrence,
    delay_embed,
    oti,
    qmax,
    qmax_pair,
)
from refrain.service.cli import build_parser, main
from refrain.training.evaluate import Item, evaluate_detailed

from helpers import SR, pitch_shift, synth_song, time_stretch

pytest.importorskip("librosa")  # the train extra

SONG_S = 30.0


def mono16k(x: np.ndarray) -> np.ndarray:
    return resample(x.mean(1).astype(np.float32), SR, 16000)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def scorer() -> QmaxScorer:
    return QmaxScorer(workers=1)


@pytest.fixture(scope="module")
def songs() -> list[np.ndarray]:
    """Four unrelated songs (44.1 kHz stereo)."""
    return [synth_song(SONG_S, seed) for seed in (11, 12, 13, 14)]


@pytest.fixture(scope="module")
def chromas(scorer, songs) -> list[np.ndarray]:
    return [scorer.chroma(mono16k(x)) for x in songs]


def test_chroma_sequence_rate_and_range(scorer, chromas):
    assert chromas[0].shape == (round(SONG_S * 2), 12)  # 2 frames per second
    assert chromas[0].dtype == np.float32
    np.testing.assert_allclose(chromas[0].max(1), 1.0, rtol=1e-5)  # each frame peaks at 1
    assert (chromas[0] >= 0).all()
    # a second of audio still makes a sequence the alignment accepts
    assert scorer.chroma(mono16k(synth_song(1.0, 3))).shape == (2, 12)


def test_transposed_copy_scores_as_the_copy_thanks_to_oti(chromas):
    x = chromas[0]
    same = qmax_pair(x, x)
    assert same >= 0.8 * len(x)  # the main diagonal, nearly the whole song
    for k in range(1, 12):
        shifted = np.roll(x, k, axis=1)
        assert oti(x.mean(0), shifted.mean(0)[None]) == [k]
        assert qmax_pair(x, shifted) == same
        # without the transposition the copy aligns no better than another song
        states = [unit(delay_embed(y, 5, 1)) for y in (x, shifted)]
        assert qmax(cross_recurrence(*states, 0.1)) < 0.4 * same, k


def test_unrelated_and_random_sequences_score_low(chromas):
    x = chromas[0]
    same = qmax_pair(x, x)
    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    assert qmax_pair(x, noise) < 0.2 * same
    silence = np.zeros_like(x)  # all frames alike: none is a preferred neighbour
    assert qmax_pair(x, silence) < 0.2 * same and qmax_pair(silence, x) < 0.2 * same
    for other in chromas[1:]:  # songs of one generator share chords: a third of the self-score
        assert qmax_pair(x, other) < 0.4 * same


def test_time_stretched_transposed_excerpt_finds_its_song(scorer, songs, chromas):
    # 12 s from 9 s into song 0, played 15% faster and two semitones up
    start = int(9 * SR)
    clip = pitch_shift(time_stretch(songs[0][start : start + 12 * SR], 1.15), 2)
    query = scorer.chroma(mono16k(clip))
    assert len(query) == pytest.approx(12 / 1.15 * 2, abs=1)
    scores = [qmax_pair(query, c) for c in chromas]
    assert scores[0] > 1.5 * max(scores[1:]), scores
    assert scores[0] >= 0.5 * len(query)


def test_recurrence_is_librosas_nearest_neighbours_both_ways():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(1)
    a, b = unit(rng.standard_normal((30, 24))), unit(rng.standard_normal((50, 24)))
    kappa = 0.1
    ours = cross_recurrence(a, b, kappa)
    # librosa: [j, i] when data_ref[j] is among the k nearest of data[i]
    row = librosa.segment.cross_similarity(a.T, b.T, k=5, metric="cosine").T  # ceil(0.1 * 50)
    col = librosa.segment.cross_similarity(b.T, a.T, k=3, metric="cosine")  # ceil(0.1 * 30)
    np.testing.assert_array_equal(ours, row & col)
    assert ours.any() and ours.sum(1).max() <= 5 and ours.sum(0).max() <= 3


def test_qmax_is_the_best_path_with_gaps():
    rec = np.zeros((12, 12), dtype=bool)
    for i in range(10):
        rec[i, i] = True  # a diagonal of 10 ...
    rec[5, 5] = False  # ... with a one-frame gap (onset 5): 5 + 4 - 5 + ... stays the best
    assert qmax(rec, gap_onset=5.0, gap_extend=0.5) == 5.0
    assert qmax(rec, gap_onset=0.5, gap_extend=0.5) == pytest.approx(9 - 0.5)
    knight = np.zeros((8, 12), dtype=bool)
    for i in range(6):
        knight[i, 2 * i] = True  # a path at twice the tempo: knight moves only
    assert qmax(knight) == 6.0
    with pytest.raises(ValueError, match="at least 2 x 2"):
        qmax(np.ones((1, 5)))


def test_scorer_stands_in_for_a_model_in_evaluate(scorer, chromas):
    items = [Item("a"), Item("a"), Item("b"), Item("b")]
    zs = [chromas[0], np.roll(chromas[0][4:], 3, axis=1), chromas[1], chromas[1][:40]]
    ev = evaluate_detailed(scorer, items, embeddings=zs, query_seconds=())
    result = ev.results["track (qmax)"]
    assert (result.map.mean, result.n_queries) == (1.0, 4)
    assert list(ev.per_query["track (qmax)"]["nearest"]) == [1, 0, 3, 2]
    report = ev.to_dict()
    assert report["pairwise"]["pairs"] == 16 and report["pairwise"]["workers"] == 1
    assert report["pairwise"]["ms_per_pair"] > 0
    assert report["settings"]["reduction"] == "qmax"
    assert report["settings"]["model"]["name"] == "qmax" and report["settings"]["model"]["m"] == 5


@pytest.mark.slow
def test_process_pool_gives_the_same_matrices(monkeypatch, chromas):
    queries = [chromas, [c[10:30] for c in chromas]]
    local, cost = QmaxScorer(workers=1).distances(queries, chromas)
    monkeypatch.setattr(qmax_module, "_POOL_MIN_CELLS", 0)
    pooled, pool_cost = QmaxScorer(workers=2).distances(queries, chromas)
    for a, b in zip(local, pooled, strict=False):
        np.testing.assert_array_equal(a, b)
    assert (cost.workers, pool_cost.workers, pool_cost.pairs) == (1, 2, 32)


def test_baseline_option_values():
    parser = build_parser()
    base = ["evaluate", "--manifest", "m.csv"]
    assert parser.parse_args(base).baseline is None
    assert parser.parse_args([*base, "--baseline"]).baseline == "2dftm"
    assert parser.parse_args([*base, "--baseline", "2dftm"]).baseline == "2dftm"
    assert parser.parse_args([*base, "--baseline", "qmax", "--jobs", "3"]).jobs == 3
    assert parser.parse_args([*base, "--baseline", "qmax-upper"]).baseline == "qmax-upper"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--baseline", "dtw"])
    assert QmaxParams(m=5).to_dict()["m"] == 5
    with pytest.raises(ValueError, match="kappa"):
        QmaxParams(kappa=0)


@pytest.mark.parametrize("baseline", ["qmax", "qmax-upper", "qmax-tune"])
def test_cli_end_to_end_on_synthesised_versions(tmp_path, songs, capsys, baseline):
    # three works, three versions each: the original, transposed, slower and filtered
    rows = ["clique,path"]
    for w, x in enumerate(songs[:3]):
        versions = {
            "orig": x[: 15 * SR],
            "up3": pitch_shift(x[: 15 * SR], 3),
            "slow": time_stretch(x[: 14 * SR], 0.9),
        }
        for name, y in versions.items():
            sf.write(tmp_path / f"w{w}_{name}.flac", y, SR)
            rows.append(f"w{w},w{w}_{name}.flac")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "qmax.json"
    argv = [
        "evaluate",
        "--manifest",
        str(manifest),
        "--baseline",
        baseline,
        "--jobs",
        "1",
        "--query-seconds",
        "10",
        "--json",
        str(out),
    ]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "track (qmax)" in printed and "segment 10 s (qmax)" in printed
    assert "qmax: 162 pairs in" in printed and "ms per pair" in printed
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"track (qmax)", "segment 10 s (qmax)"}
    # chance: two relevant among eight candidates ranked at random, MAP about 0.4
    assert results["track (qmax)"]["map"]["mean"] >= 0.9
    assert results["segment 10 s (qmax)"]["map"]["mean"] >= 0.7
    assert report["pairwise"]["pairs"] == 2 * 9 * 9
    assert report["pairwise"]["scorer"] == "qmax" and report["pairwise"]["wall_s"] > 0
    model = report["settings"]["model"]
    assert model["name"] == "qmax"
    # the paper's chroma, the upper chroma, or the tune chroma verification aligns
    want = (36, 1.5) if baseline == "qmax-upper" else (0, 1.0)
    assert (model["lowest_bin"], model["power"]) == want
    assert model.get("tune", False) == (baseline == "qmax-tune")


def test_a_random_ranking_scores_chance(tmp_path, capsys):
    """`--baseline random`: the floor, computed through the same evaluation."""
    rows = ["clique,path"]
    for w in range(4):
        for v in range(2):
            x = 0.1 * np.random.default_rng(10 * w + v).standard_normal(6 * SR)
            sf.write(tmp_path / f"w{w}_{v}.wav", x.astype(np.float32), SR)
            rows.append(f"w{w},w{w}_{v}.wav")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    argv = ["evaluate", "--manifest", str(tmp_path / "m.csv"), "--baseline", "random"]
    maps = []
    for seed in range(12):
        out = tmp_path / f"random{seed}.json"
        assert main([*argv, "--query-seconds", "", "--seed", str(seed), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        maps.append(report["results"]["track (random)"]["map"]["mean"])
        assert report["pairwise"]["pairs"] == 8 * 8
    # one relevant among seven candidates: 1/rank averages H(7) / 7 = 0.370 over random orders
    assert abs(np.mean(maps) - 0.370) < 0.1 and np.std(maps) > 0.01
    assert "track (random)" in capsys.readouterr().out


def test_missing_librosa_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "m.csv").write_text("clique,path\nA,a.wav\n")
    monkeypatch.setitem(sys.modules, "librosa", None)  # import librosa now fails
    monkeypatch.setitem(sys.modules, "librosa.sequence", None)
    assert main(["evaluate", "--manifest", str(tmp_path / "m.csv"), "--baseline", "qmax"]) == 2
    assert "the Qmax baseline needs librosa: pip install" in capsys.readouterr().err
