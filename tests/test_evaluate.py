"""The evaluation protocol: manifest, track and segment levels, seeding, the CLI.

The fixture model is untrained, so these tests check the protocol, never the accuracy,
except where embeddings are identical by construction (one recording in two codecs).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from refrain.model import load_model
from refrain.service.cli import main
from refrain.training.evaluate import EvalOptions, Item, evaluate, evaluate_detailed, read_manifest

DATA = Path(__file__).parent / "data"
CKPT = DATA / "clews-official-A" / "checkpoint_best.ckpt"
SR = 16000
# Tracks of the test manifest, in order: (clique, file, duration in seconds).
TRACKS = [
    ("A", "audio/song75s.flac", 75.0),
    ("A", "audio/song75s.mp3", 75.0),
    ("B", "synth/melody.wav", 24.0),
    ("B", "synth/melody_up_slow.wav", 24.0 * 1.1),
    ("C", "synth/noise_white.wav", 12.0),
    ("C", "synth/noise_brown.wav", 12.0),
    ("D", "synth/drone.wav", 15.0),  # alone in its clique: queries with no relevant candidate
]
TAUS = (5.0, 30.0)


def melody(shift: float = 1.0, note_s: float = 0.5, seconds: float = 24.0) -> np.ndarray:
    notes = np.array([220, 247, 262, 294, 330, 294, 262, 247]) * shift
    t = np.arange(int(note_s * SR)) / SR
    envelope = np.minimum(1.0, 20 * t) * np.exp(-3 * t)
    tones = [envelope * sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)) for f in notes]
    reps = int(np.ceil(seconds / (note_s * len(notes))))
    return 0.3 * np.tile(np.concatenate(tones), reps)[: int(seconds * SR)]


def write_manifest(root: Path, rows: list[tuple[str, str]], name="manifest.csv") -> Path:
    lines = ["title,clique,path"] + [
        f"t{n},{clique},{path}" for n, (clique, path) in enumerate(rows)
    ]
    manifest = root / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalset")
    (root / "audio").mkdir()
    (root / "synth").mkdir()
    for name in ("song75s.flac", "song75s.mp3"):
        shutil.copy(DATA / "audio" / name, root / "audio" / name)
    rng = np.random.default_rng(7)
    t = np.arange(15 * SR) / SR
    signals = {
        "melody.wav": melody(),
        "melody_up_slow.wav": melody(2 ** (1 / 12), 0.55, 24.0 * 1.1),
        "noise_white.wav": 0.2 * rng.standard_normal(12 * SR),
        "noise_brown.wav": np.cumsum(rng.standard_normal(12 * SR)),
        "drone.wav": 0.2 * sum(np.sin(2 * np.pi * f * t) for f in (110, 165, 220)),
    }
    for name, x in signals.items():
        x = 0.8 * x / np.abs(x).max()
        sf.write(root / "synth" / name, x.astype(np.float32), SR, subtype="PCM_16")
    return write_manifest(root, [(clique, path) for clique, path, _ in TRACKS])


@pytest.fixture(scope="module")
def model():
    return load_model(CKPT)


@pytest.fixture(scope="module")
def evaluation(model, dataset):
    return evaluate_detailed(model, read_manifest(dataset), query_seconds=TAUS, seed=0)


@pytest.fixture(scope="module")
def precomputed(model, dataset):
    """Whole-track embeddings and waveforms of the manifest, for cheap reruns."""
    items = read_manifest(dataset)
    waves = [model.waveform(item.path) for item in items]
    return items, model.embed_many(waves, hop=5.0), waves


# -- manifest ------------------------------------------------------------------------------


def test_manifest_paths_are_relative_to_its_folder_and_extra_columns_ignored(dataset):
    items = read_manifest(dataset)
    assert [item.clique for item in items] == [clique for clique, _, _ in TRACKS]
    assert [item.path for item in items] == [dataset.parent / path for _, path, _ in TRACKS]


def test_manifest_with_byte_order_mark_and_spaces(tmp_path, dataset):
    target = dataset.parent / "audio" / "song75s.flac"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"\ufeffpath, clique\n{target}, A\n", encoding="utf-8")
    assert read_manifest(manifest) == [Item("A", target)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("work,path\nA,x.flac\n", "line 1: expected a header with columns clique,path"),
        ("", "line 1: expected a header"),
        ("clique,path\n", "expected at least one track"),
        ("clique,path\nA,song.flac\n,song.flac\n", "line 3: empty clique"),
        ("clique,path\nA,song.flac\nA\n", "line 3: empty path"),
        ("clique,path\nA,song.flac\nB,missing.flac\n", "line 3: no such file"),
        (
            "clique,path\nA,song.flac\nB,./song.flac\n",
            "line 3: ./song.flac is already listed on line 2",
        ),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, text, message):
    (tmp_path / "song.flac").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        read_manifest(manifest)


# -- the protocol on real audio --------------------------------------------------------------


def test_levels_counts_and_labels(evaluation):
    assert list(evaluation.results) == [
        "track (bpwr-10)",
        "segment 5 s (min)",
        "segment 30 s (min)",
    ]
    assert (evaluation.n_tracks, evaluation.n_cliques, evaluation.skipped) == (7, 4, [])
    for label, result in evaluation.results.items():
        # the lone drone has no relevant candidate and is not scored, but stays a candidate
        assert (result.n_queries, result.n_skipped) == (6, 1), label
        assert 6 not in evaluation.per_query[label]["track"]
        assert 0 <= result.map.mean <= 1
    assert evaluation.n_without_relevant == 3


def test_codec_pair_retrieves_each_other_first(evaluation):
    arrays = evaluation.per_query["track (bpwr-10)"]
    for query, other in ((0, 1), (1, 0)):
        row = list(arrays["track"]).index(query)
        assert arrays["nearest"][row] == other
        assert arrays["ap"][row] == 1.0
        assert arrays["rank1"][row] == 1


def test_a_track_never_retrieves_itself(evaluation):
    for label, arrays in evaluation.per_query.items():
        assert (arrays["nearest"] != arrays["track"]).all(), label
        assert set(arrays["nearest"]) <= set(range(len(TRACKS)))


def test_segment_queries_lie_inside_their_track(evaluation):
    for tau in TAUS:
        arrays = evaluation.per_query[f"segment {tau:g} s (min)"]
        durations = np.array([TRACKS[i][2] for i in arrays["track"]])
        offsets = arrays["offset_s"]
        assert (offsets >= 0).all()
        assert (offsets <= np.maximum(durations - tau, 0) + 1e-9).all()
        # a track shorter than the query is used whole
        assert (offsets[durations <= tau] == 0).all()
    # both 75 s tracks get a random offset, not the start
    arrays = evaluation.per_query["segment 5 s (min)"]
    assert (arrays["offset_s"][arrays["track"] < 2] > 0).all()


def test_same_seed_same_numbers_other_seed_other_offsets(evaluation, precomputed, model):
    items, whole, waves = precomputed

    def run(seed):
        return evaluate_detailed(
            model, items, embeddings=whole, waveforms=waves, query_seconds=(5,), seed=seed
        )

    first, again, other = run(0), run(0), run(1)
    label = "segment 5 s (min)"
    assert first.results == again.results
    for key, values in first.per_query[label].items():
        np.testing.assert_array_equal(values, again.per_query[label][key])
    # offsets for one length do not depend on which other lengths are evaluated
    np.testing.assert_array_equal(
        first.per_query[label]["offset_s"], evaluation.per_query[label]["offset_s"]
    )
    long_tracks = first.per_query[label]["track"] < 2
    assert (
        first.per_query[label]["offset_s"][long_tracks]
        != other.per_query[label]["offset_s"][long_tracks]
    ).all()


def test_several_queries_per_track(precomputed, model):
    items, whole, waves = precomputed
    ev = evaluate_detailed(
        model, items, embeddings=whole, waveforms=waves, query_seconds=(5,), queries_per_track=2
    )
    arrays = ev.per_query["segment 5 s (min)"]
    assert ev.results["segment 5 s (min)"].n_queries == 12
    assert list(arrays["track"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert arrays["offset_s"][0] != arrays["offset_s"][1]


# -- hand-computed cases with constructed embeddings -----------------------------------------


def test_map_of_constructed_embeddings():
    # four one-segment tracks on a line at 0, 1, 3 and 10; cliques a, a, b, b.
    # Track 2 (at 3) ranks 1 (a), 0 (a), then its clique mate 3: AP 1/3, first correct at 3;
    # 2 of the 3 irrelevant items (0, 1 and itself, excluded but kept last) precede it.
    # The other three find their clique mate first.
    items = [Item("a"), Item("a"), Item("b"), Item("b")]
    zs = [np.array([[x, 0.0]], dtype=np.float32) for x in (0.0, 1.0, 3.0, 10.0)]
    ev = evaluate_detailed(None, items, embeddings=zs, query_seconds=())
    result = ev.results["track (bpwr-10)"]
    assert result.map.mean == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    assert result.mr1.mean == pytest.approx(1.5)
    assert result.nar.mean == pytest.approx(100 * (2 / 3) / 4)
    assert (result.top1.mean, result.top10.mean) == (0.75, 1.0)
    assert list(ev.per_query["track (bpwr-10)"]["nearest"]) == [1, 0, 1, 2]
    assert evaluate(None, items, embeddings=zs, query_seconds=()) == ev.results


def test_padding_of_shorter_tracks_is_masked():
    # Tracks 0 and 2 have one segment, 1 and 3 two. Unmasked zero padding would put 0 and 2
    # at distance 0 from each other under `min`; masked, every track finds its mate first.
    items = [Item("a"), Item("a"), Item("b"), Item("b")]
    zs = [
        np.array([[10.0, 0.0]]),
        np.array([[10.0, 1.0], [50.0, 50.0]]),
        np.array([[0.0, 10.0]]),
        np.array([[1.0, 10.0], [-50.0, 50.0]]),
    ]
    for reduction in ("min", "bpwr-10", "meanmin"):
        result = evaluate(None, items, embeddings=zs, query_seconds=(), reduction=reduction)
        assert result[f"track ({reduction})"].map.mean == 1.0, reduction


def test_library_argument_errors(model):
    zs = [np.zeros((1, 2), dtype=np.float32)] * 2
    with pytest.raises(ValueError, match="at least one clique with two or more"):
        evaluate(None, [Item("a"), Item("b")], embeddings=zs, query_seconds=())
    with pytest.raises(ValueError, match="a model is needed"):
        evaluate(None, [Item("a"), Item("a")], embeddings=zs)
    with pytest.raises(ValueError, match="expected 2 embeddings"):
        evaluate(None, [Item("a"), Item("a")], embeddings=zs[:1], query_seconds=())
    with pytest.raises(ValueError, match=r"one dimension, got dimensions \[2, 3\]"):
        evaluate(
            None, [Item("a"), Item("a")], embeddings=[zs[0], np.zeros((1, 3))], query_seconds=()
        )
    with pytest.raises(TypeError, match="unknown evaluation options"):
        evaluate(None, [Item("a"), Item("a")], embeddings=zs, query_secs=())
    with pytest.raises(ValueError, match="unknown reduction"):
        EvalOptions(reduction="nearest")
    with pytest.raises(ValueError, match="query lengths"):
        EvalOptions(query_seconds=(5, -1))
    with pytest.raises(ValueError, match="neither a path nor a waveform"):
        evaluate(model, [Item("a"), Item("a")], query_seconds=())


# -- command line ----------------------------------------------------------------------------


def test_cli_end_to_end(dataset, tmp_path, capsys):
    root = dataset.parent
    (root / "broken.wav").write_bytes(b"RIFF0000WAVEnot audio")
    rows = [(clique, path) for clique, path, _ in TRACKS if clique in "AC"] + [("C", "broken.wav")]
    manifest = write_manifest(root, rows, "cli.csv")
    out = tmp_path / "results" / "eval.json"
    argv = [
        "evaluate",
        "--manifest",
        str(manifest),
        "--checkpoint",
        str(CKPT),
        "--query-seconds",
        "20",
        "--max-seconds",
        "40",
        "--seed",
        "3",
        "--json",
        str(out),
        "--per-query",
    ]
    assert main(argv) == 1  # one file could not be decoded; the rest is evaluated

    captured = capsys.readouterr()
    assert "track (bpwr-10)" in captured.out and "segment 20 s (min)" in captured.out
    assert "4 tracks, 2 cliques, 1 skipped files, 0 queries" in captured.out
    assert "broken.wav" in captured.err
    report = json.loads(out.read_text())
    assert set(report) == {
        "settings",
        "counts",
        "results",
        "skipped",
        "wall_s",
        "tracks",
        "per_query",
    }
    settings = report["settings"]
    assert settings["model"]["zdim"] == 128 and len(settings["model"]["weights_sha256"]) == 64
    assert (settings["reduction"], settings["segment_reduction"]) == ("bpwr-10", "min")
    assert (settings["hop"], settings["seed"], settings["query_seconds"]) == (5.0, 3, [20.0])
    assert settings["max_seconds"] == 40.0 and settings["manifest"] == str(manifest)
    assert report["counts"] == {
        "tracks": 4,
        "cliques": 2,
        "skipped_files": 1,
        "queries_without_relevant": 0,
    }
    assert report["skipped"][0]["index"] == 4
    assert set(report["results"]) == {"track (bpwr-10)", "segment 20 s (min)"}
    track = report["results"]["track (bpwr-10)"]
    assert set(track) == {"map", "mr1", "nar", "top1", "top10", "n_queries", "n_skipped"}
    assert set(track["map"]) == {"mean", "low", "high"} and track["n_queries"] == 4
    per_query = report["per_query"]["segment 20 s (min)"]
    assert set(per_query) == {"track", "offset_s", "nearest", "ap", "rank1", "nar", "top1", "top10"}
    # tracks are cut to 40 s: a 20 s query of a 75 s track starts within the first 20 s
    assert max(per_query["offset_s"]) <= 20.0


def test_cli_reports_bad_options_without_traceback(dataset, capsys):
    argv = ["evaluate", "--manifest", str(dataset), "--checkpoint", str(CKPT)]
    assert main([*argv, "--query-seconds", "5,x"]) == 2
    assert "query lengths" in capsys.readouterr().err
    assert main([*argv, "--reduction", "nearest"]) == 2
    assert "unknown reduction" in capsys.readouterr().err
