"""Harmonising a tune: its key, the chords consistent with it, and a sampled chord sequence.

`harmonise` scores, for every span of the harmonic rhythm, each chord of the key's vocabulary
by how much of the tune's sounding time there falls on its chord tones (notes at the start of
the span count more), adds a prior per chord (tonic, dominant and subdominant first;
secondary dominants and borrowed chords rarely) and a preference for strong root motion and
cadences, and draws one sequence from the resulting chain by forward filtering and backward
sampling at a temperature. Two draws of one tune therefore differ where the tune allows
several chords and agree where it allows one: substitutions, inversions, added sevenths and
borrowed chords vary between versions, and the tune stays consonant with its harmony.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from refrain.training.corpus.arrange import Note

# Krumhansl-Kessler key profiles.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)
QUALITIES = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "sus4": (0, 5, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "hdim7": (0, 3, 6, 10),
}
_SEVENTH = {"maj": "maj7", "min": "min7", "dim": "hdim7"}
# (root in semitones above the tonic, quality, prior weight)
_VOCABULARY = {
    "major": (
        (0, "maj", 1.0),
        (2, "min", 0.45),
        (4, "min", 0.2),
        (5, "maj", 0.8),
        (7, "maj", 0.9),
        (9, "min", 0.55),
        (11, "dim", 0.08),
        (2, "maj", 0.12),
        (4, "maj", 0.08),
        (9, "maj", 0.06),
        (10, "maj", 0.08),
        (5, "min", 0.08),
        (8, "maj", 0.05),
        (7, "sus4", 0.05),
    ),
    "minor": (
        (0, "min", 1.0),
        (2, "dim", 0.15),
        (3, "maj", 0.5),
        (5, "min", 0.7),
        (7, "min", 0.3),
        (7, "maj", 0.75),
        (8, "maj", 0.5),
        (10, "maj", 0.45),
        (1, "maj", 0.04),
        (5, "maj", 0.1),
        (0, "maj", 0.05),
    ),
}
_DOMINANT_ROOT = 7
_FIT = 5.0  # weight of the tune's fit against the priors
_STRONG = 1.6  # extra weight of a note sounding at the start of a span


@dataclass(frozen=True)
class Key:
    tonic: int  # pitch class
    mode: str  # "major" or "minor"


@dataclass(frozen=True)
class Chord:
    root: int  # pitch class
    quality: str
    bass: int  # pitch class of the lowest note: the root, or an inversion's third or fifth

    @property
    def intervals(self) -> tuple[int, ...]:
        return QUALITIES[self.quality]

    @property
    def pitch_classes(self) -> tuple[int, ...]:
        return tuple(sorted({(self.root + i) % 12 for i in self.intervals}))

    @property
    def tones(self) -> tuple[int, ...]:
        """Pitch classes from the root up, in chord order."""
        return tuple((self.root + i) % 12 for i in self.intervals)


def estimate_key(notes: Sequence[Note]) -> Key:
    """The key whose profile best correlates with the tune's duration-weighted pitch classes;
    the last note breaks near ties (tunes end on their tonic)."""
    weights = np.zeros(12)
    for _, dur, pitch, _ in notes:
        weights[pitch % 12] += dur
    final = notes[-1][2] % 12
    weights[final] += 0.25 * weights.sum() / max(len(notes), 1)
    best, best_r = Key(0, "major"), -np.inf
    for tonic in range(12):
        for mode, profile in (("major", _MAJOR_PROFILE), ("minor", _MINOR_PROFILE)):
            r = np.corrcoef(weights, np.roll(profile, tonic))[0, 1]
            if r > best_r:
                best, best_r = Key(tonic, mode), r
    return best


def scale_of(key: Key) -> tuple[int, ...]:
    steps = MAJOR_SCALE if key.mode == "major" else MINOR_SCALE
    return tuple((key.tonic + s) % 12 for s in steps)


def mode_change(notes: Sequence[Note], key: Key) -> tuple[list[Note], Key]:
    """The tune in the parallel mode: scale degrees 3, 6 and 7 lowered (major to minor) or
    raised (minor to major), and the key it is then in."""
    degrees = (4, 9, 11) if key.mode == "major" else (3, 8, 10)
    shift = -1 if key.mode == "major" else 1
    out = []
    for onset, dur, pitch, vel in notes:
        if (pitch - key.tonic) % 12 in degrees:
            pitch += shift
        out.append((onset, dur, pitch, vel))
    return out, Key(key.tonic, "minor" if key.mode == "major" else "major")


def vocabulary(key: Key) -> list[tuple[int, str, float]]:
    """(root pitch class, quality, prior) of the chords a harmonisation chooses from."""
    return [((key.tonic + r) % 12, q, w) for r, q, w in _VOCABULARY[key.mode]]


def span_weights(notes: Sequence[Note], spans: Sequence[tuple[float, float]]) -> np.ndarray:
    """(len(spans), 12) sounding time of each pitch class of the tune in each span, notes at
    a span's start weighted by `_STRONG`."""
    w = np.zeros((len(spans), 12))
    starts = np.array([s for s, _ in spans])
    for onset, dur, pitch, _ in notes:
        end = onset + dur
        k = max(0, int(np.searchsorted(starts, onset, side="right")) - 1)
        while k < len(spans) and spans[k][0] < end:
            lo, hi = max(onset, spans[k][0]), min(end, spans[k][1])
            if hi > lo:
                strong = _STRONG if onset <= spans[k][0] + 1e-6 else 1.0
                w[k, pitch % 12] += (hi - lo) * strong
            k += 1
    return w


def _transition(vocab: Sequence[tuple[int, str, float]], key: Key) -> np.ndarray:
    """Log preference of moving from chord a to chord b (root motion)."""
    n = len(vocab)
    t = np.zeros((n, n))
    for i, (ra, qa, _) in enumerate(vocab):
        for j, (rb, _qb, _) in enumerate(vocab):
            motion = (rb - ra) % 12
            if i == j:
                t[i, j] = -0.3
            elif motion == 5:  # down a fifth: the strongest progression
                t[i, j] = 0.7
            elif motion in (2, 7, 9):
                t[i, j] = 0.25
            elif motion == 0:  # same root, other quality
                t[i, j] = -0.2
            if (ra - key.tonic) % 12 in (2, 4, 9) and qa == "maj" and motion == 5:
                t[i, j] += 0.5  # a secondary dominant resolves
    return t


def harmonise(
    notes: Sequence[Note],
    spans: Sequence[tuple[float, float]],
    key: Key,
    rng: np.random.Generator,
    temperature: float = 1.0,
    sevenths: float = 0.0,
    inversions: float = 0.0,
) -> list[Chord]:
    """One chord per span, drawn from the chain of fit, prior and root motion."""
    vocab = vocabulary(key)
    n, m = len(spans), len(vocab)
    if n == 0:
        return []
    weights = span_weights(notes, spans)
    member = np.zeros((m, 12))
    for j, (root, quality, _) in enumerate(vocab):
        for i in QUALITIES[quality]:
            member[j, (root + i) % 12] = 1.0
    total = weights.sum(axis=1, keepdims=True)
    inside = weights @ member.T
    fit = np.where(total > 0, (inside - 1.3 * (total - inside)) / np.maximum(total, 1e-9), 0.0)
    emission = _FIT * fit + np.log([w for _, _, w in vocab])[None, :]
    tonic = 0  # the vocabulary opens with the tonic chord
    dominant = [
        j
        for j, (r, q, _) in enumerate(vocab)
        if r == (key.tonic + _DOMINANT_ROOT) % 12 and q == "maj"
    ]
    emission[-1, :] -= 1.0
    emission[-1, tonic] += 3.0  # end on the tonic
    if n > 1:
        emission[-2, dominant] += 1.0  # after the dominant
    emission[0, tonic] += 1.0
    trans = _transition(vocab, key)
    e, t = emission / temperature, trans / temperature

    # Forward filtering, backward sampling.
    alpha = np.zeros((n, m))
    alpha[0] = e[0]
    for k in range(1, n):
        alpha[k] = e[k] + _logsumexp(alpha[k - 1][:, None] + t, axis=0)
    picks = [0] * n
    picks[-1] = _draw(alpha[-1], rng)
    for k in range(n - 2, -1, -1):
        picks[k] = _draw(alpha[k] + t[:, picks[k + 1]], rng)

    chords = []
    for k, j in enumerate(picks):
        root, quality, _ = vocab[j]
        if quality in _SEVENTH and rng.random() < sevenths:
            quality = _SEVENTH[quality]
        elif (
            quality == "maj"
            and root == (key.tonic + _DOMINANT_ROOT) % 12
            and rng.random() < max(sevenths, 0.3)
        ):
            quality = "7"
        tones = [(root + i) % 12 for i in QUALITIES[quality]]
        bass = root
        if k not in (0, n - 1) and rng.random() < inversions:
            bass = tones[1] if rng.random() < 0.65 else tones[2]
        chords.append(Chord(root, quality, bass))
    return chords


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    p = np.exp(logits - logits.max())
    return int(rng.choice(len(p), p=p / p.sum()))
