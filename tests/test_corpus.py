"""The version corpus: degradations, version parameters, MIDI timing, work selection (the Bach
chorales stay out), and a tiny corpus rendered end to end (needs music21 and fluidsynth)."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from refrain.training.corpus import degrade
from refrain.training.corpus.catalog import BachGuard, Facts, split_of
from refrain.training.corpus.degrade import Band, Compressor, Eq, Mp3, Noise, Reverb
from refrain.training.corpus.midi import TICKS_PER_SECOND, version_events, version_midi
from refrain.training.corpus.versions import FAMILIES, VersionOptions, VersionParams, sample_version
from refrain.training.corpus.works import Part, Work

SR = 16000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _band_db(x: np.ndarray, lo: float, hi: float) -> float:
    f, p = signal.welch(x, SR, nperseg=2048)
    return 10 * np.log10(np.mean(p[(f >= lo) & (f < hi)]))


# Degradations.


def test_eq_shelves_and_peaks_change_the_spectrum_where_asked():
    x = _noise(4.0)
    up = degrade.equalize(x, SR, (Band("highshelf", 1500.0, 12.0, 0.7),))
    assert _band_db(up, 4000, 7000) - _band_db(x, 4000, 7000) == pytest.approx(12.0, abs=1.0)
    assert _band_db(up, 50, 300) - _band_db(x, 50, 300) == pytest.approx(0.0, abs=1.0)
    down = degrade.equalize(x, SR, (Band("lowshelf", 300.0, -9.0, 0.7),))
    assert _band_db(down, 30, 100) - _band_db(x, 30, 100) == pytest.approx(-9.0, abs=1.0)
    b, a = degrade.biquad(Band("peaking", 1000.0, 6.0, 1.0), SR)
    _, h = signal.freqz(b, a, worN=[1000.0, 100.0, 6000.0], fs=SR)
    assert 20 * np.log10(np.abs(h)) == pytest.approx([6.0, 0.0, 0.0], abs=0.2)


def test_reverb_lengthens_the_decay_at_the_requested_rate():
    x = np.zeros(3 * SR, np.float32)
    x[: SR // 10] = _noise(0.1)
    rng = np.random.default_rng(1)
    wet = degrade.reverberate(x, SR, rt60_s=1.0, wet=0.5, predelay_ms=0.0, rng=rng)
    assert len(wet) == len(x)
    tail = slice(int(0.4 * SR), int(0.9 * SR))
    assert np.max(np.abs(x[tail])) == 0.0
    assert np.sqrt(np.mean(wet[tail] ** 2)) > 1e-3
    # The impulse response falls by 60 dB over rt60: measure its slope between 0.1 and 0.7 s.
    ir = degrade.impulse_response(SR, 1.0, np.random.default_rng(2))
    env = 10 * np.log10(np.convolve(ir**2, np.ones(800) / 800, mode="same") + 1e-20)
    slope = (env[int(0.7 * SR)] - env[int(0.1 * SR)]) / 0.6
    assert slope == pytest.approx(-60.0, rel=0.15)


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr_db", [0.0, 12.0, 30.0])
def test_noise_is_added_at_the_requested_snr(colour, snr_db):
    t = np.arange(3 * SR) / SR
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    y = degrade.add_noise(x, snr_db, colour, np.random.default_rng(3))
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x) ** 2.0))
    assert measured == pytest.approx(snr_db, abs=0.5)


def test_compressor_narrows_the_dynamic_range_and_keeps_the_level():
    t = np.arange(4 * SR) / SR
    loudness = np.where(t < 2.0, 1.0, 0.1)
    x = (0.5 * loudness * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    y = degrade.compress(x, SR, threshold_db=-25.0, ratio=6.0, attack_ms=5.0, release_ms=50.0)

    def spread(s):
        return 20 * np.log10(np.std(s[:SR]) / np.std(s[3 * SR :]))

    assert spread(x) == pytest.approx(20.0, abs=0.1)
    assert spread(y) < 8.0
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=1e-3)


@pytest.mark.parametrize("kbps", [32, 64, 96])
def test_mp3_round_trip_keeps_length_and_content(kbps):
    t = np.arange(5 * SR) / SR
    x = 0.4 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2
    x = x.astype(np.float32)
    data = degrade.mp3_encode(x, SR, kbps)
    assert len(data) * 8 / 5.0 / 1000 == pytest.approx(kbps, rel=0.15)
    y = degrade.mp3_decode(data)
    assert abs(len(y) - len(x)) <= 2 * 1152  # at most the codec's padding
    n = min(len(x), len(y))
    assert np.corrcoef(x[:n], y[:n])[0, 1] > 0.99
    assert len(degrade.mp3_decode(data, len(x))) == len(x)


def test_a_chain_is_deterministic_and_survives_json():
    chain = (
        Eq((Band("peaking", 800.0, 5.0, 1.0),)),
        Reverb(0.8, 0.3, 10.0),
        Compressor(-20.0, 4.0, 5.0, 100.0),
        Noise(20.0, "pink"),
        Mp3(48),
    )
    assert tuple(degrade.degradation_from_json(d.to_json()) for d in chain) == chain
    assert degrade.describe(chain) == "eq+reverb+compress+noise+mp3@48k"
    x = _noise(2.0)
    a, data_a = degrade.apply_chain(x, SR, chain, seed=5)
    b, data_b = degrade.apply_chain(x, SR, chain, seed=5)
    c, _ = degrade.apply_chain(x, SR, chain, seed=6)
    assert data_a == data_b and np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == len(x)


# Versions and their MIDI, on a synthetic work (no music21 needed).


def _work(parts: int = 3, measures: int = 16, bpm: float = 120.0) -> Work:
    notes = [
        [(float(q), 1.0, 60 + 7 * k + q % 5, 80) for q in range(4 * measures)] for k in range(parts)
    ]
    return Work(
        "test/synthetic.xml",
        "Synthetic",
        "",
        [Part(f"p{k}", n) for k, n in enumerate(notes)],
        [4.0 * m for m in range(measures + 1)],
        [(0.0, bpm)],
        (4, 4),
        True,
    )


SOUNDFONTS = ["a.sf2", "b.sf2", "c.sf3"]


def test_version_parameters_depend_on_seed_work_and_index_only():
    work = _work()
    a = [sample_version(work, k, 7, SOUNDFONTS) for k in range(8)]
    assert [sample_version(work, k, 7, SOUNDFONTS) for k in reversed(range(8))][::-1] == a
    assert [sample_version(work, k, 8, SOUNDFONTS) for k in range(8)] != a
    assert len({json.dumps(p.to_json()) for p in a}) == 8
    assert all(VersionParams.from_json(json.loads(json.dumps(p.to_json()))) == p for p in a)


def test_version_parameters_stay_in_range():
    work = _work(parts=4, measures=24)
    programs = {p for family in FAMILIES.values() for p in family} | {32, 33, 35, 38}
    for k in range(200):
        p = sample_version(work, k, 0, SOUNDFONTS)
        assert -6 <= p.transpose <= 6 and 0.7 <= p.tempo <= 1.4 and abs(p.drift) <= 0.2
        assert p.soundfont in SOUNDFONTS
        assert not p.parts[0].dropped and len(p.parts) == 4
        assert all(q.program in programs for q in p.parts)
        assert all(0 <= a < b <= 24 for a, b in p.sections)
        assert len(p.degradations) == len({d.kind for d in p.degradations})
    kinds = {
        d.kind for k in range(200) for d in sample_version(work, k, 0, SOUNDFONTS).degradations
    }
    assert kinds == {"eq", "reverb", "compress", "noise", "mp3"}


def _plain(work: Work, **changes) -> VersionParams:
    p = sample_version(work, 0, 0, SOUNDFONTS)
    parts = tuple(replace(q, dropped=False, double=0, gain=1.0) for q in p.parts)
    plain = {
        "transpose": 0,
        "tempo": 1.0,
        "drift": 0.0,
        "parts": parts,
        "drums": None,
        "jitter_ms": 0.0,
        "velocity_jitter": 0.0,
        "sections": ((0, len(work.measures) - 1),),
    }
    return replace(p, **{**plain, **changes})


def test_midi_timing_follows_tempo_sections_and_transposition():
    work = _work(parts=1, measures=8, bpm=120.0)
    events = version_events(work, _plain(work, tempo=2.0, transpose=3), max_seconds=100.0)
    assert [e.start for e in events[:4]] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert events[0].pitch == 63
    # Measures 2-3 cut, then measure 0 repeated: 7 measures of 4 quarters at 0.5 s.
    rearranged = _plain(work, sections=((0, 2), (4, 8), (0, 1)))
    events = version_events(work, rearranged, max_seconds=100.0)
    assert len(events) == 28 and events[-1].start == pytest.approx(13.5)
    assert [e.pitch for e in events[-4:]] == [e.pitch for e in events[:4]]
    # An accelerando: the second half is faster than the first.
    events = version_events(work, _plain(work, drift=0.2), max_seconds=100.0)
    gaps = np.diff([e.start for e in events])
    assert gaps[0] > gaps[-1] and gaps[0] / gaps[-1] == pytest.approx(1.1 / 0.9, rel=0.02)
    assert version_events(work, _plain(work), max_seconds=5.0)[-1].start < 5.0


def test_midi_file_has_programs_drums_and_doubling():
    pytest.importorskip("mido")
    work = _work(parts=2, measures=4)
    p = _plain(work)
    parts = (replace(p.parts[0], program=40, double=12, double_program=41), p.parts[1])
    drums = sample_version(work, 0, 0, SOUNDFONTS, VersionOptions(drums=1.0)).drums
    midi = version_midi(work, replace(p, parts=parts, drums=drums), max_seconds=60.0)
    messages = list(midi.tracks[0])
    programs = {(m.channel, m.program) for m in messages if m.type == "program_change"}
    assert (0, 40) in programs and (1, 41) in programs and (9, drums.kit) in programs
    notes = [m for m in messages if m.type == "note_on"]
    assert {m.note for m in notes if m.channel == 9} >= {36, drums.hat}
    assert sum(m.channel == 1 for m in notes) == sum(m.channel == 0 for m in notes)
    assert midi.ticks_per_beat * 2 == TICKS_PER_SECOND
    assert midi.length == pytest.approx(8.0 + 1.0, abs=0.05)  # 16 quarters at 120, and release


# Selection: the Bach chorales never enter the default collection.


def test_splits_are_by_work_and_near_the_fractions():
    ids = [f"c/w{i}.abc" for i in range(4000)]
    splits = [split_of(i) for i in ids]
    assert [split_of(i) for i in ids] == splits
    for name, share in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert splits.count(name) / len(ids) == pytest.approx(share, abs=0.02)


def test_bach_guard_recognises_chorale_tunes_elsewhere():
    guard = BachGuard.shipped()
    assert len(guard.melodies) > 300
    chorale, melody = next((k, m) for k, m in guard.melodies.items() if len(m["intervals"]) > 30)
    copy = Facts("essenFolksong/x.abc#1", intervals=tuple(melody["intervals"]))
    assert guard.match(copy) == chorale
    varied = Facts("essenFolksong/x.abc#2", intervals=(5, -5, *tuple(melody["intervals"][2:])))
    assert guard.match(varied) is not None
    other = Facts("essenFolksong/x.abc#3", intervals=tuple([2, 2, 1, -5, 7, -3, 12] * 6))
    assert guard.match(other) is None


def test_selection_skips_reserved_short_derived_and_duplicate_works(monkeypatch):
    from refrain.training.corpus import catalog as cat

    guard = BachGuard.shipped()
    chorale = next(m for m in guard.melodies.values() if len(m["intervals"]) > 30)
    tune = tuple(np.random.default_rng(0).integers(-5, 6, 60).tolist())
    facts = [
        Facts("bach/bwv1.6.mxl", seconds=60.0, notes=100, intervals=tune),
        Facts("cpebach/x.xml", seconds=60.0, notes=100, intervals=tune[1:]),
        Facts("essenFolksong/a.abc#1", seconds=12.0, notes=100, intervals=tune[2:]),
        Facts("essenFolksong/a.abc#2", error="failed to read"),
        Facts("essenFolksong/a.abc#3", seconds=40.0, notes=90, intervals=chorale["intervals"]),
        Facts("ryansMammoth/b.abc", title="Reel", seconds=30.0, notes=90, intervals=tune[3:]),
        Facts("oneills1850/c.abc#7", title="Reel", seconds=35.0, notes=90, intervals=tune[3:]),
        Facts("oneills1850/c.abc#8", title="Jig", seconds=35.0, notes=90, intervals=tune[4:]),
    ]
    catalog = cat.Catalog(None)
    catalog.add(facts)
    sources = [cat.Source(*f.id.split("#")[:1], *map(int, f.id.split("#")[1:])) for f in facts]
    monkeypatch.setattr(cat, "ordered_sources", lambda collection: sources)
    selection = cat.select_works(None, catalog, cat.SelectOptions("default"), guard=guard)
    assert [f.id for f in selection.works] == ["ryansMammoth/b.abc", "oneills1850/c.abc#8"]
    reasons = selection.rejected
    assert reasons["bach/bwv1.6.mxl"] == reasons["cpebach/x.xml"] == "reserved for evaluation"
    assert reasons["essenFolksong/a.abc#1"] == "too short"
    assert reasons["essenFolksong/a.abc#2"] == "unreadable"
    assert reasons["essenFolksong/a.abc#3"].startswith("melody of Bach chorale bach/")
    assert reasons["oneills1850/c.abc#7"] == "duplicate of ryansMammoth/b.abc"
    first = cat.select_works(1, catalog, cat.SelectOptions("default"), guard=guard)
    assert [f.id for f in first.works] == ["ryansMammoth/b.abc"]
    # --min-parts: only works written in at least that many parts
    catalog.add(
        [
            Facts(
                "palestrina/m.krn",
                title="Kyrie",
                seconds=90.0,
                notes=400,
                parts=4,
                intervals=tune[5:],
            )
        ]
    )
    sources.append(cat.Source("palestrina/m.krn"))
    parts = cat.select_works(None, catalog, cat.SelectOptions("default", min_parts=3), guard=guard)
    assert [f.id for f in parts.works] == ["palestrina/m.krn"]
    assert parts.rejected["ryansMammoth/b.abc"] == "too few parts"


def test_catalog_survives_a_torn_last_line(tmp_path):
    pytest.importorskip("music21")
    from refrain.training.corpus.catalog import Catalog, reader_version

    path = tmp_path / "catalog.jsonl"
    first = Facts("a/x.abc", seconds=30.0, intervals=(1, 2), reader=reader_version())
    Catalog(path).add([first])
    path.write_text(path.read_text() + '{"id": "a/y.abc", "sec')  # killed mid-write
    catalog = Catalog(path)
    assert len(catalog) == 1 and catalog.get("a/x.abc") == first
    second = replace(first, id="a/z.abc")
    catalog.add([second])
    reread = Catalog(path)
    assert reread.get("a/z.abc") == second and reread.get("a/y.abc") is None


def test_default_sources_hold_no_bach_and_bach_eval_only_chorales():
    pytest.importorskip("music21")
    from refrain.training.corpus.works import list_sources

    default = list_sources("default")
    assert len(default) > 10000
    assert not [s for s in default if "bach" in s.id.lower()]
    assert not [s for s in default if s.collection in ("demos", "theoryExercises")]
    chorales = list_sources("bach-eval")
    assert len(chorales) > 300
    assert all(s.path.startswith("bach/bwv") for s in chorales)


# Chorale tunes: music21's real chorale files grouped by melody (training/corpus/families.py).

# Two harmonisations of "Herzlich tut mich verlangen" (one sung as "Befiehl du deine Wege"), a
# "Befiehl du deine Wege" with a melody of its own, and one harmonisation of "O Gott, du
# frommer Gott" that music21 ships twice.
_HERZLICH = ("bach/bwv270.mxl", "bach/bwv244.62.mxl")
_OTHER_BEFIEHL = "bach/bwv272.mxl"
_TWINS = ("bach/bwv197.7-a.mxl", "bach/bwv398.mxl")


@pytest.fixture(scope="module")
def chorales():
    pytest.importorskip("music21")
    from refrain.training.corpus.works import Source, load_work

    return {i: load_work(Source(i)) for i in (*_HERZLICH, _OTHER_BEFIEHL, *_TWINS)}


def _transposed(work: Work, semitones: int, suffix: str) -> Work:
    parts = [
        Part(p.name, [(on, d, pitch + semitones, v) for on, d, pitch, v in p.notes])
        for p in work.parts
    ]
    return replace(work, id=work.id.replace(".mxl", suffix + ".mxl"), parts=parts)


def _melodies(works) -> dict:
    from refrain.training.corpus.works import intervals

    return {w.id: intervals(w.top_line()) for w in works}


def test_families_group_the_harmonisations_of_a_tune_and_separate_other_tunes(chorales):
    from refrain.training.corpus.families import (
        TUNE_THRESHOLD,
        chorale_families,
        melody,
        tune_similarity,
    )

    groups = chorale_families(_melodies(chorales.values()))
    assert sorted(groups) == sorted([sorted(_HERZLICH), [_OTHER_BEFIEHL], sorted(_TWINS)])
    # the same text sung to two tunes stays apart even though the titles match
    a, b, c = (chorales[i] for i in (*_HERZLICH, _OTHER_BEFIEHL))
    sim = tune_similarity([melody(_melodies([w])[w.id]) for w in (a, b, c)])
    assert sim[0, 1] > TUNE_THRESHOLD + 0.2 and max(sim[0, 2], sim[1, 2]) < 0.3
    assert chorale_families(_melodies(chorales.values()), titles=None) == groups


def test_families_are_transposition_invariant(chorales):
    from refrain.training.corpus.families import chorale_families, melody, tune_similarity

    a, b = (chorales[i] for i in _HERZLICH)
    up = _transposed(b, 5, "-up5")
    mels = _melodies([a, b, up])
    sim = tune_similarity([melody(mels[w.id]) for w in (a, b, up)])
    assert sim[0, 2] == pytest.approx(sim[0, 1]) and sim[1, 2] == pytest.approx(1.0)
    groups = chorale_families(_melodies([a, up, chorales[_OTHER_BEFIEHL]]), titles=None)
    assert sorted(groups) == sorted([sorted([a.id, up.id]), [_OTHER_BEFIEHL]])


def test_families_collapse_copies_of_one_harmonisation(chorales):
    from refrain.training.corpus.families import (
        harmonisation_overlap,
        same_harmonisation,
        select_families,
    )

    twin, copy = (chorales[i] for i in _TWINS)
    a, b = (chorales[i] for i in _HERZLICH)
    assert same_harmonisation(twin, copy) and harmonisation_overlap(twin, copy) == 1.0
    assert same_harmonisation(a, _transposed(a, -3, "-down3"))  # a transposed copy too
    assert not same_harmonisation(a, b)  # one tune, two harmonisations

    works = {w.id: w for w in chorales.values()}
    loaded = []

    def load(ids):
        loaded.extend(ids)
        return [works[i] for i in ids]

    rejected: dict[str, str] = {}
    tunes = select_families(_melodies(works.values()), list(works), None, load, 2, rejected)
    (family,) = tunes.families  # the twins are one harmonisation: too few
    assert family.members == sorted(_HERZLICH) and tunes.singles == 2
    assert (
        family.id.startswith("t")
        and family.id
        == select_families(_melodies(works.values()), list(works), None, load, 2).families[0].id
    )
    assert rejected[_TWINS[0]].startswith("tune with fewer than 2")
    everything = select_families(_melodies(works.values()), list(works), None, load, 1, {})
    by_members = {tuple(f.members): f for f in everything.families}
    kept = by_members[(_TWINS[0],)]  # same parts and length: the first by name stays
    assert kept.duplicates == {_TWINS[1]: _TWINS[0]} and len(everything.families) == 3
    # --works counts tunes, in an order fixed by their ids
    first = select_families(_melodies(works.values()), list(works), 1, load, 1, {})
    assert [f.id for f in first.families] == [everything.families[0].id]


# A tiny corpus, rendered end to end.


def _soundfonts() -> tuple[str, ...] | None:
    from refrain.training.corpus.render import find_soundfonts

    found = find_soundfonts()
    quick = [str(p) for p in found if p.suffix == ".sf2"]  # .sf3 fonts load slowly
    return tuple(quick[:2]) if quick else (tuple(str(p) for p in found[:1]) or None)


def renderer_or_skip() -> tuple[str, ...]:
    """The soundfonts a test renders with; skips the test without mido, FluidSynth or a
    soundfont."""
    pytest.importorskip("mido")
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (Debian: apt-get install fluidsynth)")
    soundfonts = _soundfonts()
    if not soundfonts:
        pytest.skip("no soundfont installed (Debian: apt-get install fluid-soundfont-gm)")
    return soundfonts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("music21")
    soundfonts = renderer_or_skip()
    from refrain.training.corpus import main
    from refrain.training.corpus.pipeline import CorpusOptions

    root = tmp_path_factory.mktemp("corpus")
    options = CorpusOptions(
        out=root / "a",
        works=3,
        versions=2,
        seed=0,
        max_seconds=25.0,
        soundfonts=soundfonts,
        jobs=2,
        catalog=root / "catalog.jsonl",
    )
    argv = ["render", "--out", str(options.out), "--works", "3", "--versions", "2"]
    argv += ["--seed", "0", "--max-seconds", "25", "--jobs", "2", "--quiet"]
    argv += ["--catalog", str(options.catalog)]
    for font in soundfonts:
        argv += ["--soundfont", font]
    assert main(argv) == 0
    return options


def _rows(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "params.jsonl").read_text().splitlines()]


def test_tiny_corpus_manifest_and_audio(corpus):
    from refrain.training.corpus.pipeline import MANIFEST_COLUMNS

    options = corpus
    out = options.out
    assert json.loads((out / "corpus.json").read_text())["failed"] == []
    rows = _rows(out)
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) == 6
    assert len({r["clique"] for r in rows}) == 3
    assert sorted(r["version"] for r in rows) == ["0", "0", "0", "1", "1", "1"]
    records = {(r["clique"], r["version"]): r for r in _records(out)}
    for row in rows:
        audio, sr = sf.read(out / row["path"], dtype="float32")
        assert sr == options.sample_rate and audio.ndim == 1
        duration = len(audio) / sr
        assert duration == pytest.approx(float(row["duration_s"]), abs=1e-3)
        expected = records[(row["clique"], int(row["version"]))]["expected_s"]
        assert expected - 0.1 <= duration <= options.max_seconds + 1e-3
        assert np.sqrt(np.mean(audio**2)) > 0.01 and np.max(np.abs(audio)) > 0.5
        assert Path(row["soundfont"]).name in {Path(s).name for s in options.soundfonts}


def test_tiny_corpus_holds_no_bach_and_splits_by_work(corpus):
    options = corpus
    for r in _records(options.out):
        assert "bach" not in r["work"].lower() and "bach" not in r["composer"].lower()
        assert "bwv" not in (r["title"] + r["work"]).lower()
    by_clique: dict[str, set] = {}
    for row in _rows(options.out):
        by_clique.setdefault(row["clique"], set()).add(row["split"])
        assert row["split"] == split_of(row["work"])
    assert all(len(s) == 1 for s in by_clique.values())


def test_tiny_corpus_is_deterministic_and_resumable(corpus):
    from refrain.training.corpus.pipeline import build_corpus

    options = corpus
    again = replace(options, out=options.out.parent / "b", jobs=1)
    build_corpus(again, progress=False)
    first, second = _rows(options.out), _rows(again.out)
    assert first == second
    for a, b in zip(first, second, strict=False):
        assert (options.out / a["path"]).read_bytes() == (again.out / b["path"]).read_bytes()
    assert [r["params"] for r in _records(options.out)] == [
        r["params"] for r in _records(again.out)
    ]

    # Rerunning renders nothing; a version whose record is gone is rendered again, alone.
    stamps = {r["path"]: (again.out / r["path"]).stat().st_mtime_ns for r in second}
    assert build_corpus(again, progress=False).rendered == 0
    (again.out / second[0]["path"]).with_suffix(".json").unlink()
    summary = build_corpus(again, progress=False)
    assert (summary.rendered, summary.skipped) == (1, 5)
    for r in second[1:]:
        assert (again.out / r["path"]).stat().st_mtime_ns == stamps[r["path"]]
    assert _rows(again.out) == second

    # Another seed: the same works, other versions.
    other = build_corpus(
        replace(again, out=options.out.parent / "c", seed=1, versions=1), progress=False
    )
    third = _rows(options.out.parent / "c")
    assert other.rendered == 3 and {r["clique"] for r in third} == {r["clique"] for r in first}
    v0 = [r for r in first if r["version"] == "0"]
    assert [(r["transpose"], r["tempo"]) for r in third] != [
        (r["transpose"], r["tempo"]) for r in v0
    ]


def test_bach_eval_renders_the_harmonisations_of_a_tune_as_one_clique(tmp_path, monkeypatch):
    pytest.importorskip("music21")
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (Debian: apt-get install fluidsynth)")
    soundfonts = _soundfonts()
    if not soundfonts:
        pytest.skip("no soundfont installed (Debian: apt-get install fluid-soundfont-gm)")
    from refrain.training.corpus import catalog as cat
    from refrain.training.corpus import main
    from refrain.training.corpus.works import Source

    # three of music21's chorale files, not all 412: two harmonisations of one tune, another
    chosen = [Source(i) for i in (*_HERZLICH, _OTHER_BEFIEHL)]
    monkeypatch.setattr(cat, "ordered_sources", lambda collection: chosen)
    out = tmp_path / "bach"
    argv = ["render", "--out", str(out), "--collection", "bach-eval", "--works", "0"]
    argv += ["--versions", "1", "--max-seconds", "8", "--quiet", "--soundfont", soundfonts[0]]
    assert main(argv) == 0
    rows = _rows(out)
    assert sorted(r["work"] for r in rows) == sorted(_HERZLICH)  # the other tune has one
    assert len({r["clique"] for r in rows}) == 1 and rows[0]["clique"].startswith("t")
    assert len({Path(r["path"]).parent for r in rows}) == 2  # a folder per harmonisation
    assert all(r["split"] == "eval" for r in rows)
    assert sf.info(out / rows[0]["path"]).duration == pytest.approx(8.0, abs=0.01)
    (family,) = json.loads((out / "families.json").read_text())["families"]
    assert family["family"] == rows[0]["clique"]
    assert {m["work"] for m in family["members"]} == set(_HERZLICH)
    assert {r["family"] for r in _records(out)} == {rows[0]["clique"]}
    info = json.loads((out / "corpus.json").read_text())
    assert info["skipped_sources"] == {"tune with fewer than 2 harmonisations": 1}
    # resumable: a rerun renders nothing and writes the same manifest
    assert main(argv) == 0
    assert _rows(out) == rows
