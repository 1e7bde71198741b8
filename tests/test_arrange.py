"""Arrangements: new harmonisations, textures, grooves and tune variations of one work, and a
tiny arranged corpus rendered and trained on end to end."""

import csv
import itertools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from refrain.training.corpus.arrange import (
    HYMN_BPM,
    TEXTURES,
    Arrangement,
    arrange,
    blended,
    chord_difference,
    even_time,
    evened,
    sample_arrangement,
    tune_of,
)
from refrain.training.corpus.harmony import Key, estimate_key, harmonise, mode_change
from refrain.training.corpus.midi import version_events
from refrain.training.corpus.report import tune_fit
from refrain.training.corpus.versions import VersionOptions, VersionParams, sample_version
from refrain.training.corpus.works import Part, Work

SOUNDFONTS = ["a.sf2", "b.sf2"]
# "Twinkle, twinkle" in C major (A B B A), in quarters.
_TWINKLE_A = [60, 60, 67, 67, 69, 69, 67, 65, 65, 64, 64, 62, 62, 60]
_TWINKLE_B = [67, 67, 65, 65, 64, 64, 62]
_TWINKLE = _TWINKLE_A + _TWINKLE_B + _TWINKLE_B + _TWINKLE_A


def _tune(pitches=_TWINKLE, meter=(4, 4), rhythm=None) -> Work:
    """A one-part tune: half notes at the end of every phrase of seven, quarters elsewhere."""
    notes, t = [], 0.0
    for i, p in enumerate(pitches):
        d = rhythm[i % len(rhythm)] if rhythm else (2.0 if i % 7 == 6 else 1.0)
        notes.append((t, d, p, 80))
        t += d
    bar = 4.0 * meter[0] / meter[1]
    n = int(np.ceil(t / bar))
    return Work(
        "test/tune.abc",
        "Tune",
        "",
        [Part("melody", notes)],
        [bar * k for k in range(n + 1)],
        [(0.0, 100.0)],
        meter,
        True,
    )


def _plain(**kw) -> Arrangement:
    base = {
        "seed": 1,
        "texture": "block",
        "bass": "root",
        "counter": False,
        "rhythm": "beat",
        "temperature": 1.0,
        "sevenths": 0.0,
        "inversions": 0.0,
        "mode_change": False,
        "groove": "straight",
        "ornaments": 0.0,
        "rhythm_variation": 0.0,
        "octave_phrase": False,
        "handoff": False,
    }
    return Arrangement(**{**base, **kw})


def test_key_and_mode_change():
    work = _tune()
    assert estimate_key(tune_of(work)) == Key(0, "major")
    minor, key = mode_change(tune_of(work), Key(0, "major"))
    assert key == Key(0, "minor")
    assert {p % 12 for _, _, p, _ in minor} == {0, 2, 3, 5, 7, 8}  # E and A lowered
    shifted = [(o, d, p + 5, v) for o, d, p, v in tune_of(work)]
    assert estimate_key(shifted) == Key(5, "major")


def test_harmonisations_fit_the_tune_and_differ_between_versions():
    work = _tune()
    arrangements = [sample_arrangement(work, np.random.default_rng(k)) for k in range(8)]
    fits = [tune_fit(work, a) for a in arrangements]
    assert min(fits) >= 0.75, fits  # the tune's notes on a chord change are mostly chord tones
    differences = [chord_difference(work, a, b) for a, b in itertools.combinations(arrangements, 2)]
    assert np.median(differences) >= 0.3, differences
    assert chord_difference(work, arrangements[0], arrangements[0]) == 0.0
    # The same draw gives the same chords; the cadence lands on the tonic.
    spans = [(2.0 * k, 2.0 * k + 2.0) for k in range(24)]
    a = harmonise(tune_of(work), spans, Key(0, "major"), np.random.default_rng(3))
    assert a == harmonise(tune_of(work), spans, Key(0, "major"), np.random.default_rng(3))
    assert a[-1].root == 0


def test_an_arrangement_keeps_the_tune_on_top_and_every_texture_plays():
    work = _tune()
    tune = tune_of(work)
    for texture in TEXTURES:
        arranged = arrange(
            work,
            _plain(
                texture=texture,
                bass="none" if texture in ("hymn", "oompah", "walking", "alberti") else "root",
            ),
        )
        melody = next(p for p in arranged.parts if p.name == "melody")
        assert [n[2] for n in melody.notes] == [n[2] for n in tune], texture
        others = [n for p in arranged.parts if p.name != "melody" for n in p.notes]
        assert len(arranged.parts) >= 2 and others, texture
        assert all(0 <= n[0] < work.quarters + 1e-6 and 0 <= n[2] < 128 for n in others)
        # The accompaniment lies under the tune.
        assert np.mean([n[2] for n in others]) < np.mean([n[2] for n in tune]) - 3, texture
    hymn = arrange(work, _plain(texture="hymn", bass="none"))
    assert [p.name for p in hymn.parts] == ["melody", "alto", "tenor", "bass"]
    for part in hymn.parts[1:]:  # one chord tone per beat under the soprano
        assert len(part.notes) == len(tune) + sum(1 for n in tune if n[1] == 2.0)


def test_tune_variations_swing_and_meter_change():
    work = _tune()
    tune = tune_of(work)
    varied = arrange(work, _plain(ornaments=1.0, rhythm_variation=0.3, seed=4))
    melody = next(p for p in varied.parts if p.name == "melody").notes
    assert len(melody) > len(tune)  # passing notes and ornaments added
    # Every note of the tune still starts where it did, or half a beat early (anticipation).
    starts = {round(n[0], 6) for n in melody}
    assert all(round(o, 6) in starts or round(o - 0.5, 6) in starts for o, _, _, _ in tune)

    eighths = _tune(rhythm=[0.5])
    swung = arrange(eighths, _plain(groove="swing"))
    onsets = sorted({round(n[0] % 1.0, 3) for n in swung.parts[0].notes})
    assert onsets == [0.0, 0.667]

    waltz = _tune(meter=(3, 4), rhythm=[1.0, 1.0, 1.0])
    common = arrange(waltz, _plain(groove="meter"))
    assert common.meter == (4, 4)
    assert np.allclose(np.diff(common.measures), 4.0)
    firsts = [n for n in common.parts[0].notes if abs(n[0] % 4.0) < 1e-6]
    assert all(n[1] == pytest.approx(2.0) for n in firsts)  # the first beat held twice as long

    handed = arrange(_tune(_TWINKLE * 2), _plain(handoff=True, seed=2))
    names = [p.name for p in handed.parts]
    assert "melody handoff" in names
    total = sum(len(p.notes) for p in handed.parts if p.name.startswith("melody"))
    assert total == 2 * len(_TWINKLE)


def test_originals_are_drawn_as_before_and_arrangements_survive_json():
    work = _tune()
    options = VersionOptions(arrange=1.0, originals=1)
    assert sample_version(work, 0, 5, SOUNDFONTS, options) == sample_version(work, 0, 5, SOUNDFONTS)
    assert "arrangement" not in sample_version(work, 3, 5, SOUNDFONTS).to_json()
    arranged = sample_version(work, 1, 5, SOUNDFONTS, options)
    assert arranged.arrangement is not None
    assert VersionParams.from_json(json.loads(json.dumps(arranged.to_json()))) == arranged
    assert sample_version(work, 1, 5, SOUNDFONTS, options) == arranged
    # The events of an arranged version come from its arrangement, drums in its groove.
    drums = replace(
        arranged,
        drums=sample_version(work, 1, 5, SOUNDFONTS, VersionOptions(arrange=1.0, drums=1.0)).drums,
    )
    events = version_events(work, drums, max_seconds=60.0)
    channels = {e.channel for e in events}
    assert 9 in channels and len(channels) >= 3
    plain = version_events(work, sample_version(work, 0, 5, SOUNDFONTS), max_seconds=60.0)
    assert len(events) > 2 * len(plain)


@pytest.mark.slow
def test_tiny_arranged_corpus_renders_reports_and_trains(tmp_path):
    pytest.importorskip("music21")
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (Debian package fluidsynth)")
    from refrain.training.corpus import main
    from refrain.training.corpus.render import find_soundfonts
    from refrain.training.train import RunConfig, train

    fonts = [str(p) for p in find_soundfonts()][:1]
    if not fonts:
        pytest.skip("no soundfont installed (Debian: apt-get install fluid-soundfont-gm)")
    out = tmp_path / "corpus"
    argv = [
        "render",
        "--out",
        str(out),
        "--works",
        "3",
        "--versions",
        "3",
        "--tunes",
        "--arrange",
        "1",
        "--max-seconds",
        "20",
        "--seed",
        "4",
        "--jobs",
        "2",
        "--quiet",
        "--splits",
        "1,0,0",
        "--soundfont",
        fonts[0],
    ]
    assert main(argv) == 0
    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    records = [json.loads(line) for line in (out / "params.jsonl").read_text().splitlines()]
    assert sum(r["params"].get("arrangement") is not None for r in records) == 6
    assert main(["harmony", str(out), "--json", str(tmp_path / "h.json")]) == 0
    figures = json.loads((tmp_path / "h.json").read_text())
    assert figures["pairs"] == 3 and figures["chord_difference"]["mean"] > 0.2

    raw = {
        "model": {
            "frontend": {"channels": [8, 16]},
            "backbone": {"blocks": [1], "channels": [16], "down": [1]},
            "zdim": 16,
        },
        "data": {
            "manifest": str(out / "manifest.csv"),
            "cache": str(tmp_path / "cache"),
            "crop_s": 20,
            "versions_per_work": 3,
        },
        "training": {
            "out": str(tmp_path / "run"),
            "works_per_batch": 2,
            "steps_per_epoch": 1,
            "epochs": 1,
        },
    }
    assert (train(RunConfig.from_dict(raw)) / "model.safetensors").exists()


def test_blended_settings_voice_the_tune_inside_the_chords():
    work = _tune()
    plain = VersionOptions(arrange=1.0, originals=1)
    blend = VersionOptions(arrange=1.0, originals=1, blend=1.0)
    for version in range(1, 9):
        before = sample_version(work, version, 5, SOUNDFONTS, plain)
        # blend 0 draws exactly what corpora drawn before blending existed drew
        assert sample_version(work, version, 5, SOUNDFONTS, replace(plain, blend=0.0)) == before
        assert "blend" not in before.to_json()["arrangement"]
        mixed = sample_version(work, version, 5, SOUNDFONTS, blend)
        a = mixed.arrangement
        assert a.blend and a.texture == "hymn" and not a.counter and not a.handoff
        assert a.rhythm == "beat" and mixed.to_json()["arrangement"]["blend"] is True
        assert VersionParams.from_json(json.loads(json.dumps(mixed.to_json()))) == mixed
        # voiced as an original: families of the general table, no louder tune
        families = [p.family for p in mixed.parts]
        arranged = arrange(work, a)
        assert len(families) == len(arranged.parts) >= 3
        assert arranged.parts[0].name == "melody"
        assert all(0.6 <= p.gain <= 1.1 for p in mixed.parts if p.family != "bass")
    # half of the arranged versions are blended at 0.5
    half = replace(blend, blend=0.5)
    share = np.mean(
        [sample_version(work, v, 5, SOUNDFONTS, half).arrangement.blend for v in range(1, 201)]
    )
    assert 0.4 < share < 0.6


def test_even_versions_retime_the_tune_a_beat_per_note():
    # Dotted and syncopated folk rhythm, in 6/8: the even version forgets all of it.
    jig = _tune(meter=(6, 8), rhythm=[1.5, 0.5, 1.0, 0.5, 0.5, 0.5, 3.0])
    even = even_time(jig)
    notes = even.parts[0].notes
    assert [n[2] for n in notes] == [n[2] for n in tune_of(jig)]  # every pitch, in order
    # A beat per note; two for a note that lasted two beats of the jig (a dotted half), three
    # for the last.
    lengths = [n[1] for n in notes]
    assert set(lengths[:-1]) == {1.0, 2.0} and lengths[-1] == 3.0
    assert all(lengths[i] == 2.0 for i in range(6, len(notes) - 1, 7))
    assert even.meter == (4, 4) and np.allclose(np.diff(even.measures), 4.0)
    assert even.measures[-1] >= notes[-1][0] + notes[-1][1] - 1e-6
    assert even.tempo == [(0.0, HYMN_BPM)]
    # Two tunes of one rhythm but other pitches are re-timed alike: only pitches differ.
    other = _tune([p + (2 if i % 3 else -1) for i, p in enumerate(_TWINKLE)], rhythm=[0.5, 1.5])
    assert [n[:2] for n in even_time(other).parts[0].notes] == [
        n[:2] for n in even_time(_tune(rhythm=[1.0, 1.0])).parts[0].notes
    ]

    # A blended even setting: a chord under every note of the tune, as a chorale has.
    a = evened(blended(_plain(groove="swing", rhythm_variation=0.3, ornaments=0.35)))
    assert a.even and a.rhythm == "beat" and a.groove == "straight"
    assert a.rhythm_variation == 0.0 and a.ornaments == 0.15
    assert Arrangement.from_json(json.loads(json.dumps(a.to_json()))) == a
    assert "even" not in _plain().to_json()
    arranged = arrange(jig, replace(a, ornaments=0.0))
    melody = arranged.parts[0].notes
    assert [(n[0], n[2]) for n in melody] == [(n[0], n[2]) for n in notes]
    for part in arranged.parts[1:]:
        assert {round(n[0], 6) for n in part.notes} >= {round(n[0], 6) for n in notes}
    # Its chords, compared with a version in the jig's own rhythm, note by note.
    own = blended(_plain(seed=9))
    assert 0.0 < chord_difference(jig, own, replace(a, ornaments=0.0)) <= 1.0
    assert chord_difference(jig, a, a) == 0.0
    assert tune_fit(jig, a) >= 0.75

    # even 0 draws exactly what corpora drawn before it existed drew; at 0.5, half are even.
    base = VersionOptions(arrange=1.0, originals=0, blend=0.5)
    for version in range(6):
        before = sample_version(jig, version, 5, SOUNDFONTS, base)
        assert sample_version(jig, version, 5, SOUNDFONTS, replace(base, even=0.0)) == before
    half = replace(base, even=0.5)
    drawn = [sample_version(jig, v, 5, SOUNDFONTS, half) for v in range(200)]
    assert 0.4 < np.mean([d.arrangement.even for d in drawn]) < 0.6
    evens = [d for d in drawn if d.arrangement.even]
    assert VersionParams.from_json(json.loads(json.dumps(evens[0].to_json()))) == evens[0]
    events = version_events(jig, evens[0], max_seconds=60.0)
    assert events and max(e.start for e in events) > 10.0
