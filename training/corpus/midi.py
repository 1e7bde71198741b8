"""From a work and a version's parameters to a MIDI file.

Every event is placed in seconds first (sections rearranged, tempo scaled and drifting,
onsets jittered), and the file is written at a fixed 120 quarter notes per minute, so that one
tick is always 1/960 s and no tempo map needs to reach the synthesiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from refrain.training.corpus.grooves import groove_notes
from refrain.training.corpus.tune import tune_parts
from refrain.training.corpus.versions import DRUM_CHANNEL, VersionParams, performed_work
from refrain.training.corpus.works import Work

if TYPE_CHECKING:
    import mido

TICKS_PER_BEAT = 480
TICKS_PER_SECOND = 2 * TICKS_PER_BEAT  # at the file's fixed 120 quarter notes per minute
_GRID = 0.125  # quarters per step when integrating the tempo curve
_MIN_NOTE_S = 0.03
_RELEASE_S = 1.0  # silence left at the end for the last notes to ring
_CHANNELS = [c for c in range(16) if c != DRUM_CHANNEL]


@dataclass(frozen=True)
class Event:
    start: float  # seconds
    end: float
    channel: int
    pitch: int
    velocity: int
    tune: bool = False  # a note of the tune as written (`refrain.training.corpus.tune`)


class Timeline:
    """Maps positions of the rearranged version (in quarters) to seconds and back to the
    work's own positions."""

    def __init__(self, work: Work, params: VersionParams) -> None:
        m = work.measures
        self.spans = []  # (version start, work start, work stop), in quarters
        position = 0.0
        for a, b in params.sections:
            self.spans.append((position, m[a], m[b]))
            position += m[b] - m[a]
        self.quarters = position
        grid_v, grid_s = [0.0], [0.0]
        for v0, w0, w1 in self.spans:
            steps = max(1, int(np.ceil((w1 - w0) / _GRID)))
            w = np.linspace(w0, w1, steps + 1)
            mid_w = 0.5 * (w[1:] + w[:-1])
            mid_v = v0 + mid_w - w0
            bpm = np.array([work.bpm_at(x) for x in mid_w]) * params.tempo
            bpm *= 1.0 + params.drift * (mid_v / max(self.quarters, 1e-9) - 0.5)
            dt = np.diff(w) * 60.0 / bpm
            grid_v.extend((v0 + w[1:] - w0).tolist())
            grid_s.extend((grid_s[-1] + np.cumsum(dt)).tolist())
        self._v, self._s = np.array(grid_v), np.array(grid_s)

    def seconds(self, position: np.ndarray | float) -> np.ndarray:
        return np.interp(position, self._v, self._s)

    @property
    def duration(self) -> float:
        return float(self._s[-1])


def _lines(params: VersionParams) -> list[list[tuple[int, int, int]]]:
    """Per part, the (channel, octave shift, program) of each line it plays: none when dropped,
    two when doubled. Channels are shared only beyond 15 lines."""
    channels = iter(_CHANNELS * 8)
    lines = []
    for plan in params.parts:
        own = []
        if not plan.dropped:
            own.append((next(channels), 0, plan.program))
            if plan.double:
                own.append((next(channels), plan.double, plan.double_program))
        lines.append(own)
    return lines


def version_events(work: Work, params: VersionParams, max_seconds: float) -> list[Event]:
    """All notes of the version in seconds, cut at `max_seconds`."""
    work = performed_work(work, params)
    rng = np.random.default_rng(params.seed)
    timeline = Timeline(work, params)
    tune = tune_parts(work)
    raw = []  # (start quarter, end quarter, channel, pitch, velocity, tune)
    for k_part, (part, plan, lines) in enumerate(
        zip(work.parts, params.parts, _lines(params), strict=False)
    ):
        notes = np.array(part.notes, dtype=np.float64).reshape(-1, 4)
        for v0, w0, w1 in timeline.spans:
            inside = notes[(notes[:, 0] >= w0) & (notes[:, 0] < w1)]
            for onset, dur, pitch, vel in inside.tolist():
                for channel, shift, _ in lines:
                    p = int(pitch) + params.transpose + shift
                    if 0 <= p < 128:
                        v = vel * plan.gain * (0.8 if shift else 1.0)
                        is_tune = k_part in tune and shift == 0
                        end = v0 + min(onset + dur, w1) - w0
                        raw.append((v0 + onset - w0, end, channel, p, v, is_tune))
    if params.drums is not None and params.arrangement is not None:
        gain = 100.0 * params.drums.gain
        for v0, w0, w1 in timeline.spans:
            for start, end, key, level in groove_notes(work, params.arrangement, w0, w1):
                raw.append((v0 + start - w0, v0 + end - w0, DRUM_CHANNEL, key, gain * level, False))
    elif params.drums is not None:
        raw.extend(_drum_notes(work, params, timeline))
    if not raw:
        return []

    starts = timeline.seconds(np.array([r[0] for r in raw]))
    ends = timeline.seconds(np.array([r[1] for r in raw]))
    jitter = rng.normal(0.0, params.jitter_ms / 1000.0, len(raw))
    velocities = np.array([r[4] for r in raw]) + rng.normal(0.0, params.velocity_jitter, len(raw))
    events = []
    for k, (_, _, channel, pitch, _, is_tune) in enumerate(raw):
        start = max(0.0, starts[k] + jitter[k])
        end = max(ends[k] + jitter[k], start + _MIN_NOTE_S)
        if start >= max_seconds - _MIN_NOTE_S:
            continue
        velocity = int(np.clip(round(velocities[k]), 1, 127))
        events.append(Event(start, min(end, max_seconds), channel, pitch, velocity, is_tune))
    return _untangle(events)


def _drum_notes(work: Work, params: VersionParams, timeline: Timeline) -> list[tuple]:
    """A kick/snare/time-keeping pattern on every measure of the version."""
    drums = params.drums
    assert drums is not None, "drum notes are made for versions with drums"
    numerator, denominator = work.meter
    beat = 4.0 / denominator
    compound = denominator == 8 and numerator % 3 == 0 and numerator > 3
    if compound:  # dotted-quarter beats, time kept in eighths
        pulses, tick = numerator // 3, 1.5
        kick, snare = {0}, ({1} if pulses == 2 else set(range(1, pulses)))
        fill = 0.5
    elif numerator == 3:
        pulses, tick, kick, snare, fill = 3, beat, {0}, {1, 2}, beat
    elif numerator in (2, 4):
        pulses, tick, kick, snare, fill = numerator, beat, {0, 2}, {1, 3}, beat / 2
    else:
        pulses, tick, kick, snare, fill = numerator, beat, {0}, set(), beat
    gain = 100.0 * drums.gain
    notes = []
    m = work.measures
    for v0, w0, w1 in timeline.spans:
        for a in [x for x in m if w0 <= x < w1]:
            bar_end = min(next((x for x in m if x > a), w1), w1)
            for k in range(pulses):
                t = a + k * tick
                if t >= bar_end - 1e-6:
                    break
                if k in kick:
                    notes.append((v0 + t - w0, v0 + t - w0 + 0.25, DRUM_CHANNEL, 36, gain, False))
                if k in snare:
                    notes.append(
                        (v0 + t - w0, v0 + t - w0 + 0.25, DRUM_CHANNEL, 38, gain * 0.9, False)
                    )
            t = a
            while t < bar_end - 1e-6:
                notes.append(
                    (v0 + t - w0, v0 + t - w0 + 0.1, DRUM_CHANNEL, drums.hat, gain * 0.6, False)
                )
                t += fill
    return notes


def _untangle(events: list[Event]) -> list[Event]:
    """End each note before the next one of the same pitch on the same channel starts, so that
    one note's note-off never silences another; drop exact unisons."""
    events = sorted(events, key=lambda e: (e.channel, e.pitch, e.start, -e.end))
    out = []
    for k, e in enumerate(events):
        nxt = events[k + 1] if k + 1 < len(events) else None
        if nxt is not None and (nxt.channel, nxt.pitch) == (e.channel, e.pitch):
            if nxt.start - e.start < _MIN_NOTE_S:
                continue
            e = Event(e.start, min(e.end, nxt.start), e.channel, e.pitch, e.velocity, e.tune)
        out.append(e)
    return sorted(out, key=lambda e: (e.start, e.channel, e.pitch))


def version_midi(work: Work, params: VersionParams, max_seconds: float) -> mido.MidiFile:
    """The version as a one-track MIDI file."""
    import mido  # the train extra's: only rendering needs it

    events = version_events(work, params, max_seconds)
    messages = []  # (tick, order, message): note-offs sort before note-ons at one tick
    rng = np.random.default_rng(params.seed + 1)
    for channel, _, program in (line for lines in _lines(params) for line in lines):
        change = mido.Message("program_change", channel=channel, program=program)
        messages.append((0, 0, change))
        messages += _controls(channel, params.synth_effects, rng)
    if params.drums is not None:
        kit = mido.Message("program_change", channel=DRUM_CHANNEL, program=params.drums.kit)
        messages.append((0, 0, kit))
        messages += _controls(DRUM_CHANNEL, params.synth_effects, rng)
    for e in events:
        on, off = round(e.start * TICKS_PER_SECOND), round(e.end * TICKS_PER_SECOND)
        messages.append(
            (on, 2, mido.Message("note_on", channel=e.channel, note=e.pitch, velocity=e.velocity))
        )
        messages.append(
            (max(off, on + 1), 1, mido.Message("note_off", channel=e.channel, note=e.pitch))
        )
    end = max((m[0] for m in messages), default=0) + round(_RELEASE_S * TICKS_PER_SECOND)
    messages.append((end, 3, mido.MetaMessage("marker", text="end")))
    messages.sort(key=lambda m: (m[0], m[1]))

    midi = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(120)))
    now = 0
    for tick, _, message in messages:
        track.append(message.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    midi.tracks.append(track)
    return midi


def _controls(channel: int, effects: bool, rng: np.random.Generator) -> list[tuple]:
    """Channel volume and, when the synthesiser's effects are on, reverb and chorus sends."""
    import mido

    out = [(0, 0, mido.Message("control_change", channel=channel, control=7, value=100))]
    if effects:
        for control, top in ((91, 90), (93, 60)):
            value = int(rng.integers(0, top + 1))
            out.append(
                (
                    0,
                    0,
                    mido.Message("control_change", channel=channel, control=control, value=value),
                )
            )
    return out
