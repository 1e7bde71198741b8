"""Arrangements: versions that keep a work's tune and replace everything else.

A cover keeps the melody and changes the harmony, the accompaniment, the groove and often the
tune's own surface. `arrange` turns a work into such a version: it takes the tune (the top line
of the melody part), finds its key, draws a new harmonisation (one chord per beat, half bar or
bar, among the chords consistent with the tune's notes there, sampled so that every version's
choices differ), and writes new parts from it: an accompaniment texture (block chords, pads,
arpeggios, Alberti bass, oom-pah, strumming, four-part hymn voicing, jazz comping over a
walking bass), a bass line, sometimes a counter-melody. The tune itself may gain passing notes
and ornaments, dotted rhythms and anticipations, a phrase an octave away, a phrase handed to
another instrument, a change of mode, a swung or shuffled feel, or a change of meter. An even
version (`evened`) re-times the tune as a hymn tune first: a beat per note, so that the
tune's own rhythm, which a folk tune's versions share and a chorale's do not distinguish, no
longer tells works apart and only its pitches do.

The result is an ordinary `Work`, rendered by the rest of the corpus pipeline like any other
(instruments, key, tempo, cuts, drums and mix are drawn on top). Everything is drawn from the
`Arrangement` record alone, so a version is reproducible from its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from refrain.training.corpus.harmony import (
    Chord,
    Key,
    estimate_key,
    harmonise,
    mode_change,
    scale_of,
)
from refrain.training.corpus.textures import accompaniment, bass_line, counter_melody
from refrain.training.corpus.works import Part, Work

TEXTURES = ("block", "pad", "arpeggio", "alberti", "oompah", "strum", "hymn", "walking")
BASS_STYLES = ("root", "root-fifth", "walking", "none")
GROOVES = ("straight", "swing", "shuffle", "meter")
RHYTHMS = ("beat", "half", "bar")
# Textures that carry their own bass line.
_OWN_BASS = frozenset({"oompah", "hymn", "walking", "alberti"})
Note = tuple[float, float, int, int]  # onset, duration (quarters), MIDI pitch, velocity
# positions within a full bar (quarters) and where a change of meter puts them
BarMap = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Arrangement:
    """The choices of one arranged version (the `arrangement` record in params.jsonl)."""

    seed: int
    texture: str
    bass: str
    counter: bool
    rhythm: str  # harmonic rhythm: a chord per beat, half bar or bar
    temperature: float  # of the chord sampling: higher, more unusual choices
    sevenths: float  # share of chords with an added seventh
    inversions: float  # share of chords over their third or fifth
    mode_change: bool  # the tune in the parallel mode (major <-> minor)
    groove: str
    ornaments: float  # chance per long note of an ornament or a passing note
    rhythm_variation: float  # chance per beat of a dotted rhythm or an anticipation
    octave_phrase: bool  # one phrase of the tune an octave away
    handoff: bool  # one phrase of the tune played by another instrument
    blend: bool = False  # a blended four-part setting (`blended`); voiced as an original
    even: bool = False  # the tune re-timed a beat per note (`evened`, `even_time`)

    def to_json(self) -> dict:
        d = asdict(self)
        for flag in ("blend", "even"):  # records drawn before these existed stay the same
            if not d[flag]:
                del d[flag]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Arrangement:
        return cls(**d)


def sample_arrangement(work: Work, rng: np.random.Generator) -> Arrangement:
    """Draw the choices of one arrangement of `work`."""
    texture = str(rng.choice(TEXTURES, p=[0.13, 0.1, 0.14, 0.1, 0.1, 0.14, 0.17, 0.12]))
    bass = (
        "none" if texture in _OWN_BASS else str(rng.choice(BASS_STYLES, p=[0.4, 0.3, 0.15, 0.15]))
    )
    rhythm = "beat" if texture == "hymn" else str(rng.choice(RHYTHMS, p=[0.3, 0.35, 0.35]))
    groove = "straight"
    u = rng.random()
    if texture == "walking" or u < 0.2:
        groove = "swing"
    elif u < 0.32:
        groove = "shuffle"
    elif u < 0.42:
        groove = "meter"
    return Arrangement(
        seed=int(rng.integers(2**31)),
        texture=texture,
        bass=bass,
        counter=bool(rng.random() < 0.3),
        rhythm=rhythm,
        temperature=round(float(rng.uniform(0.6, 1.6)), 3),
        sevenths=round(float(rng.choice((0.0, 0.2, 0.5, 0.9), p=[0.35, 0.3, 0.2, 0.15])), 3),
        inversions=round(float(rng.uniform(0.0, 0.35)), 3),
        mode_change=bool(rng.random() < 0.12),
        groove=groove,
        ornaments=round(float(rng.choice((0.0, 0.15, 0.35))), 3),
        rhythm_variation=round(float(rng.choice((0.0, 0.15, 0.3))), 3),
        octave_phrase=bool(rng.random() < 0.15),
        handoff=bool(rng.random() < 0.2),
    )


def blended(a: Arrangement) -> Arrangement:
    """`a` as a blended four-part setting: hymn voicing under the tune, a chord per beat,
    the tune whole (no handed-off phrase, no counter-melody), voiced like an original."""
    return replace(
        a, texture="hymn", bass="none", counter=False, rhythm="beat", handoff=False, blend=True
    )


def evened(a: Arrangement) -> Arrangement:
    """`a` with the tune re-timed as a hymn tune (`even_time`): no dotted rhythms or
    anticipations, no swing or change of meter, few ornaments; a blended setting puts a chord
    under every note, as a chorale does."""
    return replace(
        a,
        even=True,
        rhythm="beat" if a.blend else a.rhythm,
        groove="straight",
        rhythm_variation=0.0,
        ornaments=min(a.ornaments, 0.15),
    )


HYMN_BPM = 80.0  # quarters a minute of an even version, before the version's tempo factor


def even_time(work: Work) -> Work:
    """The tune alone, re-timed as a hymn tune is sung: a quarter per note, a half for a
    note that closed a phrase (it lasted two beats or more, rests included), a dotted half
    for the last, in 4/4 bars at `HYMN_BPM`."""
    tune = tune_of(work)
    beat = beat_length(work.meter)
    notes: list[Note] = []
    t = 0.0
    for i, (onset, _, pitch, vel) in enumerate(tune):
        if i + 1 == len(tune):
            length = 3.0
        else:
            length = 2.0 if tune[i + 1][0] - onset >= 2 * beat - 1e-6 else 1.0
        notes.append((t, length, pitch, vel))
        t += length
    bars = max(1, int(np.ceil(t / 4 - 1e-9)))
    return Work(
        id=work.id,
        title=work.title,
        composer=work.composer,
        parts=[Part("melody", notes)],
        measures=[4.0 * k for k in range(bars + 1)],
        tempo=[(0.0, HYMN_BPM)],
        meter=(4, 4),
        tempo_marked=True,
    )


def grid_of(work: Work, arrangement: Arrangement) -> Work:
    """The work an arrangement harmonises: `work`, or its tune re-timed (`even_time`)."""
    return even_time(work) if arrangement.even else work


def beat_length(meter: tuple[int, int]) -> float:
    """Quarters per beat: dotted quarters in compound meters (6/8, 9/8, 12/8)."""
    numerator, denominator = meter
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return 1.5
    return 4.0 / denominator


def tune_of(work: Work) -> list[Note]:
    """The tune: the highest note at each onset of the melody part, each ending by the next."""
    return work.top_notes()


@dataclass(frozen=True)
class Slot:
    """One chord's span in quarters, with the chord chosen for it."""

    start: float
    end: float
    chord: Chord


def harmony_slots(work: Work, rhythm: str) -> list[tuple[float, float]]:
    """The spans of the harmonic rhythm: every beat, half bar or bar of the measure grid."""
    beat = beat_length(work.meter)
    spans = []
    for a, b in zip(work.measures, work.measures[1:], strict=False):
        length = b - a
        if rhythm == "bar" or length <= beat + 1e-6:
            step = length
        elif rhythm == "half":
            beats = max(1, round(length / beat))
            step = beat * max(1, beats // 2) if beats % 2 == 0 else length
        else:
            step = beat
        t = a
        while t < b - 1e-6:
            spans.append((t, min(t + step, b)))
            t += step
    return spans


def harmonisation(
    work: Work, arrangement: Arrangement, rng: np.random.Generator
) -> tuple[list[Note], Key, list[Slot]]:
    """The tune an arrangement plays (in its mode), its key, and the chords drawn for it from
    `rng` (seeded by the arrangement: the first draws of every use are these)."""
    a = arrangement
    tune = tune_of(work)
    key = estimate_key(tune)
    if a.mode_change:
        tune, key = mode_change(tune, key)
    spans = harmony_slots(work, a.rhythm)
    chords = harmonise(tune, spans, key, rng, a.temperature, a.sevenths, a.inversions)
    return tune, key, [Slot(s, e, c) for (s, e), c in zip(spans, chords, strict=False)]


def arrange(work: Work, arrangement: Arrangement) -> Work:
    """The arranged work: tune, new accompaniment parts, the same measure grid and tempo."""
    a = arrangement
    if not work.parts[work.melody_part()].notes:  # no tune to arrange
        return work
    work = grid_of(work, a)
    rng = np.random.default_rng(a.seed)
    tune, key, slots = harmonisation(work, a, rng)
    scale = scale_of(key)

    melody = _vary_tune(tune, work, scale, a, rng)
    beat = beat_length(work.meter)
    low = min(n[2] for n in tune)
    top = int(np.clip(low - 2, 55, 72))  # accompaniment stays under the tune when it can
    parts = []
    lead, handed = _handoff(melody, work, rng) if a.handoff else (melody, [])
    parts.append(Part("melody", lead))
    if handed:
        parts.append(Part("melody handoff", handed))
    for name, notes in accompaniment(a.texture, slots, melody, work, beat, top, rng):
        parts.append(Part(name, notes))
    if a.bass != "none":
        parts.append(Part("bass", bass_line(a.bass, slots, work, beat, rng)))
    if a.counter:
        parts.append(Part("counter", counter_melody(slots, melody, beat, top, rng)))
    parts = [p for p in parts if p.notes]

    measures, meter, tempo = list(work.measures), work.meter, list(work.tempo)
    if a.groove in ("swing", "shuffle") and beat == 1.0:
        parts = [
            Part(p.name, _swing(p.notes, 2 / 3 if a.groove == "swing" else 0.72)) for p in parts
        ]
    elif a.groove == "meter":
        warp = _meter_warp(work)
        if warp is not None:
            bar_map, meter = warp
            parts = [Part(p.name, _warp_notes(p.notes, work.measures, bar_map)) for p in parts]
            measures = _warp_positions(work.measures, work.measures, bar_map)
            tempo = [(_warp_positions([t], work.measures, bar_map)[0], bpm) for t, bpm in tempo]
    return Work(
        id=work.id,
        title=work.title,
        composer=work.composer,
        parts=[Part(p.name, sorted(p.notes)) for p in parts],
        measures=measures,
        tempo=tempo,
        meter=meter,
        tempo_marked=work.tempo_marked,
    )


def chord_track(work: Work, arrangement: Arrangement) -> list[tuple[float, float, tuple[int, ...]]]:
    """The chords an arrangement plays, as (start, end, pitch classes) in the quarters of
    `grid_of(work, arrangement)` (before a meter change), for comparing the harmonisations of
    two versions."""
    return _chords(grid_of(work, arrangement), arrangement)


def _chords(grid: Work, arrangement: Arrangement) -> list[tuple[float, float, tuple[int, ...]]]:
    """`chord_track` on a grid already built (`grid_of`)."""
    _, _, slots = harmonisation(grid, arrangement, np.random.default_rng(arrangement.seed))
    return [(s.start, s.end, s.chord.pitch_classes) for s in slots]


def _vary_tune(
    tune: list[Note], work: Work, scale: tuple[int, ...], a: Arrangement, rng: np.random.Generator
) -> list[Note]:
    """The tune with passing notes, ornaments, rhythmic variation and octave displacement."""
    beat = beat_length(work.meter)
    out: list[Note] = []
    for i, (onset, dur, pitch, vel) in enumerate(tune):
        vel = int(np.clip(vel + 12, 70, 110))  # the tune leads the mix
        nxt = tune[i + 1] if i + 1 < len(tune) else None
        long = dur >= min(1.0, beat) - 1e-6
        if long and nxt is not None and rng.random() < a.ornaments:
            gap = nxt[2] - pitch
            if abs(gap) in (3, 4) and nxt[0] - (onset + dur) < 1e-6:  # passing note
                step = _scale_between(pitch, nxt[2], scale)
                if step is not None:
                    out += [(onset, dur / 2, pitch, vel), (onset + dur / 2, dur / 2, step, vel - 8)]
                    continue
            kind = rng.integers(3)
            upper = _scale_step(pitch, +1, scale)
            lower = _scale_step(pitch, -1, scale)
            if kind == 0:  # upper neighbour
                out += [
                    (onset, dur / 2, pitch, vel),
                    (onset + dur / 2, dur / 4, upper, vel - 10),
                    (onset + 3 * dur / 4, dur / 4, pitch, vel - 6),
                ]
            elif kind == 1:  # mordent
                out += [
                    (onset, dur / 8, pitch, vel),
                    (onset + dur / 8, dur / 8, lower, vel - 10),
                    (onset + dur / 4, 3 * dur / 4, pitch, vel),
                ]
            else:  # turn
                q = dur / 4
                out += [
                    (onset, q, upper, vel - 6),
                    (onset + q, q, pitch, vel - 8),
                    (onset + 2 * q, q, lower, vel - 8),
                    (onset + 3 * q, q, pitch, vel),
                ]
            continue
        out.append((onset, dur, pitch, vel))
    out = _vary_rhythm(out, beat, a.rhythm_variation, rng)
    if a.octave_phrase and len(work.measures) > 6:
        start, stop = _phrase(work, rng)
        shift = 12 if np.mean([n[2] for n in out]) < 67 else -12
        out = [(o, d, p + shift if start <= o < stop else p, v) for o, d, p, v in out]
    return out


def _vary_rhythm(notes: list[Note], beat: float, p: float, rng: np.random.Generator) -> list[Note]:
    """Dotted pairs (two equal notes become long-short) and anticipations (a note on the beat
    starts half a beat early, taking time from the note before)."""
    if p <= 0:
        return notes
    out = list(notes)
    i = 0
    while i + 1 < len(out):
        a, b = out[i], out[i + 1]
        on_beat = abs((a[0] / beat) - round(a[0] / beat)) < 1e-6
        if (
            on_beat
            and abs(a[1] - b[1]) < 1e-6
            and abs(a[0] + a[1] - b[0]) < 1e-6
            and a[1] <= beat / 2 + 1e-6
            and rng.random() < p
        ):
            whole = a[1] + b[1]
            out[i] = (a[0], whole * 0.75, a[2], a[3])
            out[i + 1] = (a[0] + whole * 0.75, whole * 0.25, b[2], b[3])
            i += 2
            continue
        if abs(a[0] + a[1] - b[0]) < 1e-6 and a[1] >= beat - 1e-6 and rng.random() < p / 2:
            shift = beat / 2
            out[i] = (a[0], a[1] - shift, a[2], a[3])
            out[i + 1] = (b[0] - shift, b[1] + shift, b[2], b[3])
        i += 1
    return out


def _scale_step(pitch: int, direction: int, scale: tuple[int, ...]) -> int:
    p = pitch + direction
    while p % 12 not in scale:
        p += direction
    return p


def _scale_between(a: int, b: int, scale: tuple[int, ...]) -> int | None:
    lo, hi = sorted((a, b))
    inner = [p for p in range(lo + 1, hi) if p % 12 in scale]
    return inner[len(inner) // 2] if inner else None


def _phrase(work: Work, rng: np.random.Generator) -> tuple[float, float]:
    """A span of 2 to 4 measures, not the first."""
    n = len(work.measures) - 1
    length = int(rng.integers(2, 5))
    first = int(rng.integers(1, max(2, n - length)))
    return work.measures[first], work.measures[min(n, first + length)]


def _handoff(
    melody: list[Note], work: Work, rng: np.random.Generator
) -> tuple[list[Note], list[Note]]:
    """The tune split in two: one phrase goes to another instrument."""
    if len(work.measures) < 8:
        return melody, []
    start, stop = _phrase(work, rng)
    kept = [n for n in melody if not start <= n[0] < stop]
    handed = [n for n in melody if start <= n[0] < stop]
    return kept, handed


def _swing(notes: list[Note], ratio: float) -> list[Note]:
    """Swung eighths: the second eighth of every quarter-note beat starts at `ratio` of it."""

    def move(t: float) -> float:
        whole = np.floor(t + 1e-9)
        u = t - whole
        return whole + (u * ratio / 0.5 if u < 0.5 else ratio + (u - 0.5) * (1 - ratio) / 0.5)

    out = []
    for onset, dur, pitch, vel in notes:
        start, end = move(onset), move(onset + dur)
        out.append((start, max(end - start, 0.05), pitch, vel))
    return out


def _meter_warp(work: Work) -> tuple[BarMap, tuple[int, int]] | None:
    """A change of meter as a map of positions within each full bar: 3/4 becomes 4/4 (the
    first beat held twice as long), 4/4 becomes 3/4 (the first half bar in one beat), 6/8
    becomes 4/4 (straight eighths). None for other meters."""
    if work.meter == (3, 4):
        return ((0.0, 1.0, 3.0), (0.0, 2.0, 4.0)), (4, 4)
    if work.meter == (4, 4):
        return ((0.0, 2.0, 4.0), (0.0, 1.0, 3.0)), (3, 4)
    if work.meter == (6, 8):
        return ((0.0, 3.0), (0.0, 4.0)), (4, 4)
    return None


def _warp_positions(
    positions: Sequence[float], measures: Sequence[float], bar_map: BarMap
) -> list[float]:
    """Positions in quarters mapped bar by bar; bars of another length (pick-ups) are scaled."""
    src, dst = bar_map
    starts = np.asarray(measures[:-1])
    lengths = np.diff(measures)
    full = src[-1]
    new_lengths = np.where(np.abs(lengths - full) < 1e-6, dst[-1], lengths * dst[-1] / full)
    new_starts = np.concatenate([[0.0], np.cumsum(new_lengths)])
    out = []
    for t in positions:
        k = int(np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1))
        u = t - starts[k]
        if abs(lengths[k] - full) < 1e-6:
            v = float(np.interp(u, src, dst))
        else:
            v = u * new_lengths[k] / max(lengths[k], 1e-9)
        out.append(float(new_starts[k] + v))
    return out


def _warp_notes(notes: list[Note], measures: Sequence[float], bar_map: BarMap) -> list[Note]:
    ends = _warp_positions([o + d for o, d, _, _ in notes], measures, bar_map)
    starts = _warp_positions([o for o, _, _, _ in notes], measures, bar_map)
    return [
        (s, max(e - s, 0.05), p, v) for s, e, (_, _, p, v) in zip(starts, ends, notes, strict=False)
    ]


def chord_difference(work: Work, a: Arrangement, b: Arrangement) -> float:
    """Share of the work's beats at which two arrangements sound different chords (pitch-class
    sets): how far apart their harmonisations are. When one of them re-times the tune
    (`even_time`) and the other does not, their beats are not the same: they are compared at
    each note of the tune instead."""
    grids = [grid_of(work, x) for x in (a, b)]
    if a.even == b.even:
        beats = [s for s, _ in harmony_slots(grids[0], "beat")]
        times = [beats, beats]
    else:
        times = [[n[0] for n in tune_of(g)] for g in grids]
    tracks = [_chords(g, x) for g, x in zip(grids, (a, b), strict=True)]
    differ = 0
    for ta, tb in zip(*times, strict=True):
        differ += _chord_at(tracks[0], ta) != _chord_at(tracks[1], tb)
    return differ / max(len(times[0]), 1)


def _chord_at(track: list[tuple[float, float, tuple[int, ...]]], t: float) -> tuple[int, ...]:
    return next((pcs for s, e, pcs in track if s <= t + 1e-6 < e), ())
