"""Versions: the random choices that make one rendering of a work differ from another.

`sample_version` draws every choice from a generator seeded by (global seed, work id, version
index) alone, so a version's parameters never depend on which other versions are rendered,
in which order, or by which process. The audio-domain randomness (noise samples, reverb
impulse responses) is seeded from `VersionParams.seed`, itself one of those draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from refrain.training.corpus.arrange import (
    Arrangement,
    arrange,
    blended,
    evened,
    sample_arrangement,
)
from refrain.training.corpus.degrade import Degradation, degradation_from_json, sample_degradations
from refrain.training.corpus.works import Work

# General MIDI programs by family. Bass programs only ever play a work's lowest part.
FAMILIES: dict[str, tuple[int, ...]] = {
    "piano": (0, 1, 2, 4, 5, 6, 7),
    "mallets": (8, 11, 12, 13),
    "organ": (16, 17, 19, 20, 21),
    "guitar": (24, 25, 26, 27),
    "strings": (40, 41, 42, 45, 48, 49),
    "harp": (46, 105, 107),
    "choir": (52, 53, 54),
    "brass": (56, 57, 58, 60, 61),
    "reeds": (64, 65, 66, 68, 70, 71),
    "pipe": (72, 73, 74, 75, 79),
    "synth lead": (80, 81),
    "synth pad": (88, 89, 90, 91, 94, 95),
}
BASS_FAMILY: tuple[str, tuple[int, ...]] = ("bass", (32, 33, 35, 38))
# Families by role in an arranged version (part names of `training.corpus.arrange`).
ROLE_FAMILIES: dict[str, tuple[str, ...]] = {
    "melody": (
        "voice",
        "choir",
        "reeds",
        "pipe",
        "strings",
        "brass",
        "synth lead",
        "organ",
        "piano",
        "guitar",
        "mallets",
        "free reed",
    ),
    "accompaniment": ("piano", "organ", "guitar", "strings", "harp", "mallets", "synth pad"),
    "pad": ("synth pad", "strings", "organ", "choir"),
    "inner": ("choir", "organ", "strings", "brass", "reeds", "piano"),
    "bass": ("bass", "bass", "bass", "low strings", "piano", "low brass"),
}
_ROLE_PROGRAMS: dict[str, tuple[int, ...]] = {
    "voice": (52, 53, 54, 85),  # choir aahs, voice oohs, synth voice, lead voice
    "free reed": (21, 22, 23),
    "bass": BASS_FAMILY[1],
    "low strings": (42, 43),
    "low brass": (57, 58),
}
# Drum kits (programs of the GM percussion bank): standard, room, power, electronic, TR-808,
# jazz, brush.
DRUM_KITS = (0, 8, 16, 24, 25, 32, 40)
DRUM_CHANNEL = 9


@dataclass(frozen=True)
class VersionOptions:
    transpose: int = 6  # semitones, drawn from -transpose..+transpose
    tempo: tuple[float, float] = (0.7, 1.4)  # factor on the base tempo
    drift: float = 0.2  # largest relative tempo change from start to end of a version
    drop_part: float = 0.3  # chance that each part beyond the first is left out
    double_part: float = 0.2  # chance that each part is doubled an octave up or down
    one_family: float = 0.4  # chance that all parts take programs of one family
    cut: float = 0.35  # chance of cutting a range of measures
    repeat: float = 0.3  # chance of playing a range of measures twice
    drums: float = 0.35  # chance of an added drum pattern
    jitter_ms: float = 25.0  # largest standard deviation of onset jitter
    synth_effects: float = 0.5  # chance of FluidSynth's own reverb and chorus
    arrange: float = 0.0  # chance that a version is a new arrangement of the work's tune
    originals: int = 1  # versions 0..originals-1 always keep the work's own parts
    # chance that an arranged version is a blended four-part setting: the tune on top of a
    # hymn voicing, every part voiced as an original's are (no lead instrument, no louder
    # tune, no counter-melody), so that the tune has to be heard inside the chords
    blend: float = 0.0
    # chance that an arranged version re-times the tune a beat per note, as a hymn tune
    # (`arrange.even_time`): versions of one work then differ in rhythm, and works whose
    # versions are all even differ only in their pitches
    even: float = 0.0


@dataclass(frozen=True)
class PartPlan:
    family: str
    program: int
    gain: float  # scales the part's velocities
    dropped: bool
    double: int  # 0, or +12 / -12: an added line an octave away
    double_program: int


@dataclass(frozen=True)
class DrumPlan:
    kit: int
    hat: int  # GM percussion key keeping time: closed hi-hat, pedal hi-hat or ride
    gain: float


@dataclass(frozen=True)
class VersionParams:
    """Everything that defines one version; `to_json` gives the params.jsonl record."""

    work: str
    version: int
    seed: int  # for the audio-domain randomness
    soundfont: str  # file name of the soundfont
    transpose: int
    tempo: float
    drift: float  # tempo at the end relative to the start, minus one
    parts: tuple[PartPlan, ...]
    sections: tuple[tuple[int, int], ...]  # measure index ranges [start, stop), played in order
    drums: DrumPlan | None
    jitter_ms: float
    velocity_jitter: float
    synth_effects: bool
    degradations: tuple[Degradation, ...]
    arrangement: Arrangement | None = None  # a new arrangement of the tune, or the work's own

    def to_json(self) -> dict:
        d = asdict(self)
        d["degradations"] = [g.to_json() for g in self.degradations]
        if self.arrangement is None:  # records of the work's own parts stay as they were
            del d["arrangement"]
        else:
            d["arrangement"] = self.arrangement.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> VersionParams:
        d = dict(d)
        d["parts"] = tuple(PartPlan(**p) for p in d["parts"])
        d["sections"] = tuple(tuple(s) for s in d["sections"])
        d["drums"] = DrumPlan(**d["drums"]) if d["drums"] else None
        d["degradations"] = tuple(degradation_from_json(g) for g in d["degradations"])
        if d.get("arrangement") is not None:
            d["arrangement"] = Arrangement.from_json(d["arrangement"])
        return cls(**d)

    @property
    def program_set(self) -> str:
        """Programs of the parts that play, e.g. "strings:40+brass:57+drums:0"."""
        names = [f"{p.family}:{p.program}" for p in self.parts if not p.dropped]
        names += [
            f"{p.family}:{p.double_program}@{p.double:+d}"
            for p in self.parts
            if p.double and not p.dropped
        ]
        if self.drums:
            names.append(f"drums:{self.drums.kit}")
        return "+".join(names)


def performed_work(work: Work, params: VersionParams) -> Work:
    """What a version plays: its arrangement of `work`, or `work` itself."""
    return work if params.arrangement is None else arrange(work, params.arrangement)


def version_rng(seed: int, work_id: str, version: int) -> np.random.Generator:
    """The generator of one version, from (global seed, work id, version index) only."""
    key = int.from_bytes(hashlib.sha256(work_id.encode()).digest()[:8], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, key, version]))


def sample_version(
    work: Work,
    version: int,
    seed: int,
    soundfonts: list[str],
    options: VersionOptions = VersionOptions(),
) -> VersionParams:
    """Draw the parameters of version `version` of `work`."""
    if not soundfonts:
        raise ValueError("expected at least one soundfont, got none")
    rng = version_rng(seed, work.id, version)
    arrangement = None
    if version >= options.originals and options.arrange > 0:
        # Its own generator: versions that are not arranged draw exactly what they always did.
        arrange_rng = version_rng(seed, work.id + "#arrange", version)
        if arrange_rng.random() < options.arrange:
            arrangement = sample_arrangement(work, arrange_rng)
            if options.blend > 0:  # its own generator too: blend 0 draws as before
                blend_rng = version_rng(seed, work.id + "#blend", version)
                if blend_rng.random() < options.blend:
                    arrangement = blended(arrangement)
            if options.even > 0:  # and so does this one
                even_rng = version_rng(seed, work.id + "#even", version)
                if even_rng.random() < options.even:
                    arrangement = evened(arrangement)
            work = arrange(work, arrangement)
    audio_seed = int(rng.integers(2**31))
    soundfont = soundfonts[int(rng.integers(len(soundfonts)))]
    transpose = int(rng.integers(-options.transpose, options.transpose + 1))
    lo, hi = options.tempo
    tempo = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    drift = float(rng.uniform(-options.drift, options.drift)) if rng.random() < 0.6 else 0.0
    if arrangement is None or arrangement.blend:
        parts = _plan_parts(work, rng, options)
    else:
        parts = _plan_roles(work, rng, options)
    sections = _plan_sections(len(work.measures) - 1, rng, options)
    drums = None
    plain = arrangement is None or arrangement.blend
    if rng.random() < (options.drums if plain else max(options.drums, 0.6)):
        kit = int(rng.choice(DRUM_KITS))
        drums = DrumPlan(kit, int(rng.choice((42, 44, 51))), float(rng.uniform(0.5, 0.9)))
    jitter = float(rng.uniform(0.0, options.jitter_ms))
    velocity_jitter = float(rng.uniform(0.0, 12.0))
    effects = bool(rng.random() < options.synth_effects)
    chain = sample_degradations(rng)
    return VersionParams(
        work=work.id,
        version=version,
        seed=audio_seed,
        soundfont=soundfont,
        transpose=transpose,
        tempo=round(tempo, 4),
        drift=round(drift, 4),
        parts=parts,
        sections=sections,
        drums=drums,
        jitter_ms=round(jitter, 2),
        velocity_jitter=round(velocity_jitter, 2),
        synth_effects=effects,
        degradations=chain,
        arrangement=arrangement,
    )


def _plan_parts(work: Work, rng: np.random.Generator, options: VersionOptions) -> tuple:
    names = list(FAMILIES)
    shared = names[int(rng.integers(len(names)))] if rng.random() < options.one_family else None
    n = len(work.parts)
    means = [np.mean([p for _, _, p, _ in part.notes]) for part in work.parts]
    lowest = int(np.argmin(means)) if n > 1 else -1
    # The top line always plays: it carries the tune of most works.
    dropped = [k > 0 and rng.random() < options.drop_part for k in range(n)]
    plans = []
    for k in range(n):
        if k == lowest and rng.random() < 0.3:
            family, programs = BASS_FAMILY
        else:
            family = shared or names[int(rng.integers(len(names)))]
            programs = FAMILIES[family]
        program = int(rng.choice(programs))
        double = int(rng.choice((12, -12))) if rng.random() < options.double_part else 0
        double_program = int(rng.choice(programs)) if double else 0
        gain = float(rng.uniform(0.6, 1.1))
        plans.append(PartPlan(family, program, round(gain, 3), dropped[k], double, double_program))
    return tuple(plans)


def _plan_roles(work: Work, rng: np.random.Generator, options: VersionOptions) -> tuple:
    """Programs of an arranged version's parts by their role: voice-like and solo instruments
    for the tune, keyboards, guitars, strings and pads for the accompaniment, basses for the
    bass; a hymn's inner voices often share one family (choir, organ, strings)."""
    shared = str(rng.choice(ROLE_FAMILIES["inner"])) if rng.random() < 0.6 else None
    melody_family = str(rng.choice(ROLE_FAMILIES["melody"]))
    plans = []
    for k, part in enumerate(work.parts):
        role = part.name.split()[0]
        if role in ("alto", "tenor") or (
            role == "bass" and shared and "alto" in [p.name for p in work.parts]
        ):
            family = shared or str(rng.choice(ROLE_FAMILIES["inner"]))
            if role == "bass" and rng.random() < 0.5:
                family = "bass"
        elif role == "melody" and part.name == "melody":
            family = melody_family
        elif role in ROLE_FAMILIES:
            family = str(rng.choice(ROLE_FAMILIES[role]))
        else:  # a handed-off phrase or a counter-melody: another solo instrument
            family = str(rng.choice(ROLE_FAMILIES["melody"]))
        programs = _ROLE_PROGRAMS.get(family) or FAMILIES[family]
        program = int(rng.choice(programs))
        dropped = k > 0 and role not in ("melody", "bass") and rng.random() < options.drop_part / 3
        double = (
            int(rng.choice((12, -12)))
            if role == "melody" and rng.random() < options.double_part
            else 0
        )
        double_program = int(rng.choice(programs)) if double else 0
        gain = float(rng.uniform(0.85, 1.1) if role == "melody" else rng.uniform(0.55, 0.95))
        plans.append(PartPlan(family, program, round(gain, 3), dropped, double, double_program))
    return tuple(plans)


def _plan_sections(n_measures: int, rng: np.random.Generator, options: VersionOptions) -> tuple:
    """Measure ranges to play: the whole work, maybe with one range cut and one repeated."""
    sections = [(0, n_measures)]
    if n_measures >= 8 and rng.random() < options.cut:
        length = int(rng.integers(1, max(2, n_measures // 4)))
        start = int(rng.integers(1, n_measures - length))
        sections = [(0, start), (start + length, n_measures)]
    if n_measures >= 8 and rng.random() < options.repeat:
        length = int(rng.integers(2, max(3, n_measures // 3)))
        flat = [m for a, b in sections for m in range(a, b)]
        start = int(rng.integers(0, len(flat) - length + 1))
        played = flat[: start + length] + flat[start : start + length] + flat[start + length :]
        sections = _ranges(played)
    return tuple(sections)


def _ranges(measures: list[int]) -> list[tuple[int, int]]:
    """Consecutive measure indices grouped into [start, stop) ranges."""
    out: list[list[int]] = []
    for m in measures:
        if out and out[-1][1] == m:
            out[-1][1] = m + 1
        else:
            out.append([m, m + 1])
    return [(a, b) for a, b in out]
