"""Drum grooves for arranged versions: rock and pop beats, half time, a march, a bossa, swing
on the ride cymbal and a triplet shuffle, in the meter the arrangement plays.

A groove is a one-bar pattern of (position in beats, GM percussion key, level) hits, repeated
on every bar of the work's measure grid (bars of another length, such as pick-ups, take the
hits that fit). Swung grooves place their off-beats at two thirds of the beat, where
`training.corpus.arrange` moves the tune's off-beat eighths.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from refrain.training.corpus.arrange import Arrangement, beat_length

if TYPE_CHECKING:
    from refrain.training.corpus.works import Work

KICK, SNARE, SIDE_STICK, CLOSED_HAT, PEDAL_HAT, OPEN_HAT, RIDE, CRASH = (
    36,
    38,
    37,
    42,
    44,
    46,
    51,
    49,
)
SHAKER = 82
_HIT_Q = 0.2  # length of a drum note in quarters (percussion ignores it)

# Straight grooves of four beats: (beat position, key, level).
_ROCK = [(0, KICK, 1.0), (1, SNARE, 0.9), (2, KICK, 1.0), (2.5, KICK, 0.7), (3, SNARE, 0.9)] + [
    (x / 2, CLOSED_HAT, 0.55) for x in range(8)
]
_POP = [(0, KICK, 1.0), (1, SNARE, 0.85), (1.5, KICK, 0.6), (2, KICK, 0.9), (3, SNARE, 0.85)] + [
    (x / 4, CLOSED_HAT, 0.4 + 0.15 * (x % 2 == 0)) for x in range(16)
]
_HALF = [(0, KICK, 1.0), (2, SNARE, 1.0), (3.5, KICK, 0.6)] + [
    (x / 2, CLOSED_HAT, 0.5) for x in range(8)
]
_MARCH = [(0, KICK, 1.0), (2, KICK, 0.9)] + [
    (x / 4, SNARE, 0.35 + 0.4 * (x % 4 == 0)) for x in range(16)
]
_BOSSA = [
    (0, KICK, 0.8),
    (1.5, KICK, 0.6),
    (2, KICK, 0.8),
    (3.5, KICK, 0.6),
    (0, SIDE_STICK, 0.7),
    (0.75, SIDE_STICK, 0.7),
    (1.5, SIDE_STICK, 0.7),
    (2.5, SIDE_STICK, 0.7),
    (3.25, SIDE_STICK, 0.7),
] + [(x / 2, SHAKER, 0.35) for x in range(8)]
_STRAIGHT = (_ROCK, _POP, _HALF, _MARCH, _BOSSA)
_SWING = [
    (0, RIDE, 0.7),
    (1, RIDE, 0.8),
    (1 + 2 / 3, RIDE, 0.55),
    (2, RIDE, 0.7),
    (3, RIDE, 0.8),
    (3 + 2 / 3, RIDE, 0.55),
    (1, PEDAL_HAT, 0.6),
    (3, PEDAL_HAT, 0.6),
] + [(x, KICK, 0.3) for x in range(4)]
_SHUFFLE = [(0, KICK, 1.0), (1, SNARE, 0.9), (2, KICK, 1.0), (3, SNARE, 0.9)] + [
    (x + t, CLOSED_HAT, 0.55 if t == 0 else 0.4) for x in range(4) for t in (0, 2 / 3)
]
# Three beats: a waltz, and its swung form.
_WALTZ = [(0, KICK, 1.0), (1, SNARE, 0.6), (2, SNARE, 0.6)] + [
    (x / 2, CLOSED_HAT, 0.45) for x in range(6)
]
_JAZZ_WALTZ = [
    (0, RIDE, 0.75),
    (1, RIDE, 0.6),
    (1 + 2 / 3, RIDE, 0.5),
    (2, RIDE, 0.6),
    (0, KICK, 0.5),
    (1, PEDAL_HAT, 0.5),
    (2, PEDAL_HAT, 0.5),
]
# Compound meters (beats of three eighths): (beat position in dotted quarters, ...).
_COMPOUND = [(0, KICK, 1.0), (1, SNARE, 0.9)] + [(x / 3, CLOSED_HAT, 0.45) for x in range(6)]


def _pattern(beats: int, compound: bool, groove: str, variant: int) -> list[tuple]:
    if compound:
        return [
            (b + 2 * r, k, v)
            for r in range((beats + 1) // 2)
            for b, k, v in _COMPOUND
            if b + 2 * r < beats
        ]
    if beats == 3:
        return _JAZZ_WALTZ if groove in ("swing", "shuffle") else _WALTZ
    four = {"swing": _SWING, "shuffle": _SHUFFLE}.get(groove) or _STRAIGHT[variant % len(_STRAIGHT)]
    if beats == 4:
        return four
    # Two beats (and other counts): the first half of the four-beat bar, repeated.
    half = [(b, k, v) for b, k, v in four if b < 2]
    return [(b + 2 * r, k, v) for r in range((beats + 1) // 2) for b, k, v in half]


def groove_notes(work: Work, arrangement: Arrangement, start: float, stop: float) -> list[tuple]:
    """(start, end, key, level) drum hits, in quarters, on the bars of `work` that begin in
    [start, stop)."""
    numerator, _denominator = work.meter
    beat = beat_length(work.meter)
    compound = beat == 1.5
    beats = numerator // 3 if compound else numerator
    variant = int(np.random.default_rng(arrangement.seed + 7).integers(len(_STRAIGHT)))
    pattern = _pattern(beats, compound, arrangement.groove, variant)
    hits = []
    m = work.measures
    for a, b in itertools.pairwise(m):
        if not start <= a < stop:
            continue
        end = min(b, stop)
        for position, key, level in pattern:
            t = a + position * beat
            if t < end - 1e-6:
                hits.append((t, t + _HIT_Q, key, level))
        if a == m[0] or (
            len(hits) and np.random.default_rng(int(a * 8) + arrangement.seed).random() < 0.08
        ):
            hits.append((a, a + _HIT_Q, CRASH, 0.6))
    return hits
