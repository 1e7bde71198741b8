"""Tune labels: the corpus renderer's frame-by-frame pitch of each version's tune."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_corpus import _plain, renderer_or_skip

from refrain.training.corpus.midi import version_events
from refrain.training.corpus.tune import (
    FRAME_RATE,
    decode_frames,
    encode_frames,
    frame_count,
    onsets,
    tune_frames,
    tune_parts,
)
from refrain.training.corpus.works import Part, Work


def _song(bpm: float = 120.0) -> Work:
    """A tune (part 0, named soprano) over two lower parts: the tune's pitches are 72-76."""
    tune = [(float(q), 1.0, 72 + q % 5, 90) for q in range(32)]
    alto = [(float(2 * q), 2.0, 64 + q % 3, 70) for q in range(16)]
    bass = [(float(4 * q), 4.0, 48 + q % 4, 70) for q in range(8)]
    return Work(
        "test/song.xml",
        "Song",
        "",
        [Part("alto", alto), Part("soprano", tune), Part("bass", bass)],
        [4.0 * m for m in range(9)],
        [(0.0, bpm)],
        (4, 4),
        True,
    )


def _labels(work: Work, params, seconds: float = 30.0) -> np.ndarray:
    events = version_events(work, params, seconds)
    end = max(e.end for e in events)
    return tune_frames(events, frame_count(round(end * 16000), 16000))


def test_the_part_named_as_the_tune_is_labelled_and_the_others_are_not():
    work = _song()
    assert tune_parts(work) == {1}
    labels = _labels(work, _plain(work))
    # a quarter at 120 bpm is 0.5 s: 25 frames per note, pitches 72, 73, 74, ...
    assert labels[0] == 72 and labels[30] == 73 and labels[60] == 74
    assert set(np.unique(labels)) <= {0, 72, 73, 74, 75, 76}
    assert np.mean(labels > 0) > 0.95


def test_labels_follow_transposition_tempo_and_rearranged_sections():
    work = _song()
    labels = _labels(work, _plain(work, transpose=-3, tempo=2.0))
    assert labels[0] == 69 and labels[13] == 70  # a quarter is 0.25 s: 12.5 frames
    # measure 1 first (tune notes 4-7: pitches 76, 72, 73, 74), then measure 0
    moved = _labels(work, _plain(work, sections=((1, 2), (0, 1))))
    assert [moved[k] for k in (10, 35, 60, 85, 110)] == [76, 72, 73, 74, 72]
    assert onsets(moved)[:3] == pytest.approx([0.0, 0.5, 1.0])


def test_an_octave_doubling_is_not_the_tune():
    work = _song()
    plain = _plain(work)
    doubled = replace(
        plain,
        parts=tuple(replace(p, double=12 if k == 1 else 0) for k, p in enumerate(plain.parts)),
    )
    events = version_events(work, doubled, 30.0)
    assert any(e.pitch >= 84 for e in events)  # the doubling sounds
    assert np.array_equal(_labels(work, doubled), _labels(work, plain))


def test_an_arrangement_labels_its_melody_and_the_phrase_handed_off():
    from refrain.training.corpus.arrange import sample_arrangement
    from refrain.training.corpus.versions import performed_work

    work = _song()
    params = _plain(work)
    for seed in range(40):
        arrangement = replace(sample_arrangement(work, np.random.default_rng(seed)), handoff=True)
        performed = performed_work(work, replace(params, arrangement=arrangement))
        if any(p.name == "melody handoff" for p in performed.parts):
            break
    else:
        pytest.skip("no arrangement with a handed-off phrase in 40 draws")
    names = [p.name for p in performed.parts]
    assert {names[k] for k in tune_parts(performed)} == {"melody", "melody handoff"}
    events = version_events(work, replace(params, arrangement=arrangement), 60.0)
    tune = [e for e in events if e.tune]
    assert tune and len(tune) < len(events)
    assert len({e.channel for e in tune}) == 2  # the lead and the other instrument


def test_labels_round_trip_and_are_one_byte_a_frame():
    labels = np.array([0, 0, 60, 60, 61, 0, 127], dtype=np.uint8)
    data = encode_frames(labels)
    assert np.array_equal(decode_frames(data), labels)
    assert onsets(labels) == pytest.approx(np.array([2, 4, 6]) / FRAME_RATE)


def test_rendered_labels_start_where_the_audio_does():
    """Render a version of a tune (transposed, faster, jittered) and find an audio onset within
    30 ms of every labelled onset but a few."""
    librosa = pytest.importorskip("librosa")
    soundfonts = renderer_or_skip()
    from refrain.training.corpus.pipeline import CorpusOptions, render_version

    work = _song()
    solo = replace(work, parts=[work.parts[1]])
    params = _plain(solo, tempo=1.1, transpose=2, jitter_ms=15.0)
    params = replace(params, degradations=(), synth_effects=False)
    params = replace(params, parts=tuple(replace(p, program=0) for p in params.parts))
    options = CorpusOptions(out=Path("unused"), max_seconds=30.0)
    audio, _ = render_version(solo, params, soundfonts[0], options)
    labels = tune_frames(version_events(solo, params, 30.0), frame_count(len(audio), 16000))
    heard = librosa.onset.onset_detect(y=audio, sr=16000, hop_length=80, units="time")
    labelled = onsets(labels)
    assert len(labelled) == 32
    gaps = np.array([np.min(np.abs(heard - t)) for t in labelled])
    assert np.mean(gaps <= 0.03) >= 0.9, np.round(gaps * 1000)
    assert np.median(gaps) <= 0.015


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny rendered corpus with tune labels: 3 works, 2 versions each, 12 s."""
    pytest.importorskip("music21")
    soundfonts = renderer_or_skip()
    from refrain.training.corpus import main

    out = tmp_path_factory.mktemp("labelled") / "c"
    argv = ["render", "--out", str(out), "--works", "3", "--versions", "2", "--tunes"]
    argv += ["--arrange", "1", "--originals", "1", "--max-seconds", "12", "--quiet"]
    argv += ["--splits", "0.5,0.5,0"]
    for font in soundfonts[:1]:
        argv += ["--soundfont", font]
    assert main(argv) == 0
    return out, argv


def test_a_rendered_corpus_writes_labels_beside_each_version(labelled):
    from refrain.training.corpus import main

    out, argv = labelled
    records = [json.loads(line) for line in (out / "params.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        labels = decode_frames((out / r["tune"]).read_bytes())
        assert len(labels) == frame_count(round(r["duration_s"] * 16000), 16000)
        assert np.mean(labels > 0) > 0.3 and labels.max() < 128
    # a corpus rendered before labels gets them on the next run, without rendering again
    first = out / records[0]["tune"]
    record_path = first.with_name(first.name.replace(".tune.npy", ".json"))
    record = json.loads(record_path.read_text())
    del record["tune"]
    record_path.write_text(json.dumps(record))
    expected = first.read_bytes()
    first.unlink()
    audio = out / records[0]["path"]
    before = audio.stat().st_mtime_ns
    assert main(argv) == 0
    assert first.read_bytes() == expected and audio.stat().st_mtime_ns == before
    first.unlink()  # a deleted label file is written again, from the notes
    assert main(argv) == 0
    assert first.read_bytes() == expected and audio.stat().st_mtime_ns == before


def test_cache_train_and_evaluate_the_salience_network_end_to_end(labelled, tmp_path, capsys):
    """`refrain salience cache`, `train` (a few steps, then resumed) and `evaluate` on the tiny
    corpus; the cache's labels sit on the CQT's strongest bins more often than chance."""
    pytest.importorskip("mir_eval")
    from refrain.model.salience import LOWEST_MIDI, TuneSalience
    from refrain.service.cli import main
    from refrain.training.tune_cache import TEXTURES, TuneCache

    out, _ = labelled
    cache_path = tmp_path / "cache.npz"
    assert main(["salience", "cache", str(out), "--out", str(cache_path), "--quiet"]) == 0
    cache = TuneCache.load(cache_path)
    assert len(cache.tracks) == 6 and {t["split"] for t in cache.tracks} == {"train", "valid"}
    assert {t["texture"] for t in cache.tracks} <= set(TEXTURES)
    voiced = cache.labels > 0
    bins = cache.labels[voiced].astype(int) - LOWEST_MIDI
    level = cache.feats[voiced, bins].astype(float)
    assert level.mean() > cache.feats[voiced].astype(float).mean() + 40  # of 255
    run = tmp_path / "run"
    argv = ["salience", "train", str(cache_path), "--out", str(run), "--steps", "3"]
    argv += ["--every", "2", "--batch", "2", "--frames", "64", "--quiet"]
    assert main(argv) == 0
    history = json.loads((run / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [2, 3]
    assert main([*argv[:5], "--steps", "4", *argv[7:]]) == 0  # resumed at step 3
    history = json.loads((run / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [2, 3, 4]
    assert TuneSalience(run / "best").net is not None
    report = tmp_path / "metrics.json"
    argv = ["salience", "evaluate", str(cache_path), "--checkpoint", str(run / "best")]
    assert main([*argv, "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    for name in ("network", "top line"):
        assert 0.0 <= figures[name]["all"]["raw_pitch_accuracy"] <= 1.0
        assert figures[name]["all"]["versions"] == 6
    assert "raw chroma accuracy" in capsys.readouterr().out
