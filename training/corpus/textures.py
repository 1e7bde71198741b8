"""Accompaniment textures, bass lines and counter-melodies written from a chord sequence.

Every function takes the harmony as `Slot`s (a chord and its span in quarters) and returns
plain (onset, duration, pitch, velocity) notes in the work's quarters. Voicings sit under
`top`, a pitch chosen below the tune's lowest note where the tune leaves room, so that the
tune stays on top of the texture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from refrain.training.corpus.arrange import Note, Slot
    from refrain.training.corpus.harmony import Chord
    from refrain.training.corpus.works import Work

_BASS_LOW = 36  # C2: bass notes lie in [36, 48)
_STRUM_STAGGER = 0.03  # quarters between the strings of a strum


def voicing(chord: Chord, top: int, n: int = 3) -> list[int]:
    """A close-position voicing of `chord` under `top`: each chord tone at its highest pitch
    not above `top`, the fifth dropped first when there are more tones than `n`."""
    tones = list(chord.tones)
    if len(tones) > n and len(tones) >= 3:
        tones.pop(2)  # the fifth
    pitches = []
    for pc in tones[:n]:
        p = top - ((top - pc) % 12)
        pitches.append(p)
    return sorted(set(pitches))


def bass_pitch(pc: int, low: int = _BASS_LOW) -> int:
    return low + (pc - low) % 12


def beats_of(slot: Slot, beat: float) -> list[float]:
    out, t = [], slot.start
    while t < slot.end - 1e-6:
        out.append(t)
        t += beat
    return out


def subdivision(beat: float) -> float:
    """Eighth notes, or sixteenths in meters whose beat is an eighth."""
    return 0.25 if beat <= 0.5 else 0.5


def melody_at(melody: list[Note], t: float) -> int | None:
    """The tune's pitch sounding (or last begun) at `t`."""
    best = None
    for onset, _dur, pitch, _ in melody:
        if onset > t + 1e-6:
            break
        best = pitch
    return best


def accompaniment(
    texture: str,
    slots: list[Slot],
    melody: list[Note],
    work: Work,
    beat: float,
    top: int,
    rng: np.random.Generator,
) -> list[tuple[str, list[Note]]]:
    """The parts of one texture, as (part name, notes)."""
    vel = int(rng.integers(52, 72))
    if texture == "block":
        return [("accompaniment", _block(slots, beat, top, vel, rng))]
    if texture == "pad":
        return [
            (
                "pad",
                [
                    (s.start, s.end - s.start, p, vel - 6)
                    for s in slots
                    for p in voicing(s.chord, top, 4)
                ],
            )
        ]
    if texture == "arpeggio":
        return [("accompaniment", _arpeggio(slots, beat, top, vel, rng))]
    if texture == "alberti":
        return [("accompaniment", _alberti(slots, beat, top, vel))]
    if texture == "oompah":
        return _oompah(slots, work, beat, top, vel)
    if texture == "strum":
        return [("accompaniment", _strum(slots, beat, top, vel, rng))]
    if texture == "hymn":
        return _hymn(slots, melody, vel + 8)
    if texture == "walking":
        comp = []
        for s in slots:
            for t in beats_of(s, beat):
                if rng.random() < 0.6:
                    off = t + beat * (0.5 if rng.random() < 0.5 else 0.0)
                    comp += [(off, beat * 0.4, p, vel) for p in voicing(s.chord, top, 4)]
        return [("accompaniment", comp), ("bass", walking_bass(slots, beat, rng))]
    raise ValueError(f"unknown texture {texture!r}")


def _block(
    slots: list[Slot], beat: float, top: int, vel: int, rng: np.random.Generator
) -> list[Note]:
    held = rng.random() < 0.3
    out = []
    for s in slots:
        pitches = voicing(s.chord, top, 3 + int(rng.random() < 0.4))
        times = [s.start] if held else beats_of(s, beat)
        length = s.end - s.start if held else beat * 0.85
        for k, t in enumerate(times):
            accent = 8 if k == 0 else 0
            out += [(t, min(length, s.end - t), p, vel + accent) for p in pitches]
    return out


def _arpeggio(
    slots: list[Slot], beat: float, top: int, vel: int, rng: np.random.Generator
) -> list[Note]:
    step = subdivision(beat)
    updown = rng.random() < 0.5
    out = []
    for s in slots:
        pitches = voicing(s.chord, top - 5, 3)
        pitches = [bass_pitch(s.chord.bass, 43), *pitches, pitches[0] + 12]
        cycle = pitches + pitches[-2:0:-1] if updown else pitches
        t, k = s.start, 0
        while t < s.end - 1e-6:
            out.append((t, min(step * 1.5, s.end - t), cycle[k % len(cycle)], vel - 4))
            t += step
            k += 1
    return out


def _alberti(slots: list[Slot], beat: float, top: int, vel: int) -> list[Note]:
    step = subdivision(beat)
    out = []
    for s in slots:
        v = voicing(s.chord, top - 3, 3)
        low = bass_pitch(s.chord.bass, 45)
        pattern = [low, v[-1], v[len(v) // 2], v[-1]]
        t, k = s.start, 0
        while t < s.end - 1e-6:
            out.append((t, min(step, s.end - t), pattern[k % 4], vel - (0 if k % 4 == 0 else 8)))
            t += step
            k += 1
    return out


def _oompah(
    slots: list[Slot], work: Work, beat: float, top: int, vel: int
) -> list[tuple[str, list[Note]]]:
    bass, chords = [], []
    bar_starts = {round(m, 6) for m in work.measures}
    alternate = 0
    for s in slots:
        for t in beats_of(s, beat):
            strong = round(t, 6) in bar_starts or (
                work.meter[0] == 4 and any(abs(t - m - 2 * beat) < 1e-6 for m in work.measures)
            )
            if strong:
                pc = s.chord.bass if alternate % 2 == 0 else (s.chord.root + 7) % 12
                bass.append((t, beat * 0.8, bass_pitch(pc), vel + 12))
                alternate += 1
            else:
                chords += [(t, beat * 0.45, p, vel) for p in voicing(s.chord, top, 3)]
    return [("bass", bass), ("accompaniment", chords)]


def _strum(
    slots: list[Slot], beat: float, top: int, vel: int, rng: np.random.Generator
) -> list[Note]:
    ups = rng.random() < 0.6
    out = []
    for s in slots:
        shape = [bass_pitch(s.chord.bass, 40), *voicing(s.chord, min(top, 66), 3)]
        shape.append(shape[1] + 12)
        strokes = []
        for t in beats_of(s, beat):
            strokes.append((t, +1, vel + 6))
            if ups and rng.random() < 0.7:
                strokes.append((t + beat / 2, -1, vel - 8))
        for k, (t, direction, v) in enumerate(strokes):
            end = strokes[k + 1][0] if k + 1 < len(strokes) else s.end
            strings = shape if direction > 0 else shape[::-1][:-1]
            for i, p in enumerate(strings):
                on = t + i * _STRUM_STAGGER
                out.append((on, max(end - on, 0.1), p, v))
    return out


def _hymn(slots: list[Slot], melody: list[Note], vel: int) -> list[tuple[str, list[Note]]]:
    """Four-part homophony with the tune as soprano: alto and tenor take the highest chord
    tones at least a third apart below it, the bass the chord's bass note."""
    alto, tenor, bass = [], [], []
    for s in slots:
        soprano = melody_at(melody, s.start)
        if soprano is None:
            continue
        tones = set(s.chord.pitch_classes)
        a = next(p for p in range(soprano - 3, soprano - 16, -1) if p % 12 in tones)
        t = next(p for p in range(a - 3, a - 16, -1) if p % 12 in tones)
        b = bass_pitch(s.chord.bass, 40)
        while b >= t - 2:
            b -= 12
        length = s.end - s.start
        alto.append((s.start, length, a, vel))
        tenor.append((s.start, length, t, vel - 4))
        bass.append((s.start, length, b, vel))
    return [("alto", alto), ("tenor", tenor), ("bass", bass)]


def walking_bass(slots: list[Slot], beat: float, rng: np.random.Generator) -> list[Note]:
    """Quarter-note bass: the chord's bass on its first beat, chord tones and steps after,
    and a half step into the next chord's bass on the last beat."""
    out = []
    for k, s in enumerate(slots):
        times = beats_of(s, beat)
        nxt = slots[k + 1].chord.bass if k + 1 < len(slots) else s.chord.root
        current = bass_pitch(s.chord.bass, 38)
        target = bass_pitch(nxt, 38)
        for i, t in enumerate(times):
            if i == 0:
                p = current
            elif i == len(times) - 1:
                p = target + (1 if rng.random() < 0.5 else -1)
            else:
                p = bass_pitch(s.chord.tones[int(rng.integers(len(s.chord.tones)))], 38)
            out.append((t, beat * 0.9, p, 84))
    return out


def bass_line(
    style: str, slots: list[Slot], work: Work, beat: float, rng: np.random.Generator
) -> list[Note]:
    if style == "walking":
        return walking_bass(slots, beat, rng)
    out = []
    for s in slots:
        root = bass_pitch(s.chord.bass)
        if style == "root":
            out.append((s.start, (s.end - s.start) * 0.95, root, 80))
            continue
        for i, t in enumerate(beats_of(s, beat)):  # root-fifth
            p = root if i % 2 == 0 else bass_pitch((s.chord.root + 7) % 12)
            out.append((t, beat * 0.9, p, 80))
    return out


def counter_melody(
    slots: list[Slot], melody: list[Note], beat: float, top: int, rng: np.random.Generator
) -> list[Note]:
    """A slower second line of chord tones, moving against the tune's direction."""
    out = []
    previous = top - 2
    last_tune = None
    for s in slots:
        tune = melody_at(melody, s.start)
        tones = set(s.chord.pitch_classes)
        candidates = [p for p in range(top - 9, top + 3) if p % 12 in tones]
        if not candidates:
            continue
        direction = 0 if tune is None or last_tune is None else int(np.sign(tune - last_tune))
        ranked = sorted(
            candidates,
            key=lambda p: (
                abs(p - previous) + 3 * (direction != 0 and np.sign(p - previous) == direction)
            ),
        )
        p = ranked[0] if rng.random() < 0.8 else ranked[min(1, len(ranked) - 1)]
        if tune is not None and p >= tune:
            p -= 12
        out.append((s.start, s.end - s.start, p, 62))
        previous, last_tune = p, tune
    return out
