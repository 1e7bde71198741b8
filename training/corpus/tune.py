"""The tune of a rendered version, frame by frame: the labels a tune-salience network learns.

Every version is rendered from notes placed in seconds (`refrain.training.corpus.midi`), so
the tune's exact pitch at every moment of the audio is known after every transformation the
version went through: transposition, tempo and drift, cut and repeated sections, jittered
onsets, the ornaments and octave displacements of a new arrangement, a phrase handed to another
instrument. `tune_frames` samples it at the CQT's frame rate: frame k holds the MIDI pitch
sounding at k / rate seconds (the centre of the k-th CQT frame), 0 where the tune rests.

Which notes are the tune: in a new arrangement, its "melody" part and the phrase handed off
("melody handoff"); in a work's own parts, the part named as the tune (soprano, cantus,
melody...), else the first; the highest of its notes where it plays a chord. An added octave
doubling is not the tune (`refrain.training.corpus.midi` marks only the line as written).

A version's labels are stored beside its audio as `vNN.tune.npy` (`encode_frames`: one byte a
frame, 50 bytes per second at the default 20 ms hop).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from refrain.training.corpus.works import Work

TUNE_PARTS = ("melody", "melody handoff")  # the names `arrange` gives the tune's parts
FRAME_RATE = 50.0  # frames per second: the model's CQT hop of 20 ms
NO_PITCH = 0


class _Note(Protocol):
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def pitch(self) -> int: ...
    @property
    def tune(self) -> bool: ...


def tune_parts(work: Work) -> frozenset[int]:
    """Indices of the parts of `work` (as performed) that carry the tune."""
    named = {k for k, p in enumerate(work.parts) if p.name in TUNE_PARTS}
    return frozenset(named) if named else frozenset({work.melody_part()})


def frame_count(samples: int, sample_rate: int, rate: float = FRAME_RATE) -> int:
    """How many frames the CQT gives for `samples` samples: one per hop, and one more."""
    return samples // round(sample_rate / rate) + 1


def tune_frames(notes: Iterable[_Note], frames: int, rate: float = FRAME_RATE) -> np.ndarray:
    """(frames,) uint8: the highest tune pitch sounding at each frame's centre, 0 for none.
    Only notes with `tune` set count."""
    out = np.zeros(frames, dtype=np.uint8)
    for note in notes:
        if not note.tune:
            continue
        a = max(0, int(np.ceil(note.start * rate - 1e-9)))
        b = min(frames, int(np.ceil(note.end * rate - 1e-9)))
        if b > a:
            np.maximum(out[a:b], np.uint8(note.pitch), out=out[a:b])
    return out


def onsets(frames: np.ndarray, rate: float = FRAME_RATE) -> np.ndarray:
    """Seconds at which the labelled tune starts a new pitch (after a rest or another pitch)."""
    f = np.asarray(frames).astype(np.int16)
    previous = np.concatenate([[NO_PITCH], f[:-1]])
    return np.flatnonzero((f != NO_PITCH) & (f != previous)) / rate


def encode_frames(frames: np.ndarray) -> bytes:
    """The `.tune.npy` bytes of a label array."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(frames, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.uint8)


def fit_frames(labels: np.ndarray, frames: int) -> np.ndarray:
    """`labels` cut or padded (with rests) to `frames` frames, to match a CQT of other length."""
    if len(labels) >= frames:
        return labels[:frames]
    return np.concatenate([labels, np.zeros(frames - len(labels), dtype=labels.dtype)])


def voiced_share(frames: Sequence[int] | np.ndarray) -> float:
    """The share of frames where the tune sounds."""
    f = np.asarray(frames)
    return float(np.mean(f != NO_PITCH)) if len(f) else 0.0
