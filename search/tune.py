"""The aligned tune of a hit: the clip's tune and the reference's, read along their alignment.

Verification locates where a clip matches a reference (`refrain.model.align.Alignment`: the
clip's and the reference's ranges, the tempo ratio and the key shift). With the search's `tune`
option, each located hit also carries the tune's contour (`refrain.model.sequence`'s, the
salience network's MIDI pitch per frame at `CONTOUR_RATE`) of the clip over its first match
and of the reference over the range it aligned with, point for point on the clip's time axis,
for a person to see why the two matched (the console draws them one above the other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refrain.index import SegmentStore
from refrain.model.align import Alignment
from refrain.model.sequence import CONTOUR_RATE, decode_contour

TUNE_POINTS = 400  # the most points of an aligned tune (80 s of clip at CONTOUR_RATE)


@dataclass(frozen=True)
class AlignedTune:
    """The tune of a clip over an aligned match and the reference's over the range it matches,
    point for point on the clip's time axis: point i covers the clip's seconds
    `query_start_s + [i, i + 1) / rate`, and the reference's point is read at the reference
    second `ref_start_s + (t - query_start_s) * tempo_ratio` of that point's middle `t`."""

    rate: float  # points per second of the clip: CONTOUR_RATE, less for a long match
    query_start_s: float
    ref_start_s: float
    tempo_ratio: float  # reference seconds per clip second
    key_shift: int  # semitones the clip was shifted by to align (the match's)
    query: np.ndarray  # (n,) int MIDI pitch per point, 0: a rest
    reference: np.ndarray  # (n,) likewise; 0 also past either end of the reference


def aligned_tune(
    match: Alignment, query: np.ndarray, reference: np.ndarray, limit: int = TUNE_POINTS
) -> AlignedTune | None:
    """The contours (MIDI pitch per frame at `CONTOUR_RATE`, 0 for rests) of the clip and of a
    reference read along `match`, at most `limit` points: a longer match takes every k-th
    frame's time (a lower `rate`). None for an empty match or contour."""
    span = match.query_end_s - match.query_start_s
    if span <= 0 or not len(query) or not len(reference):
        return None
    step = max(1, math.ceil(span * CONTOUR_RATE / limit - 1e-9))
    rate = CONTOUR_RATE / step
    n = max(1, min(limit, math.ceil(span * rate - 1e-6)))
    middle = match.query_start_s + (np.arange(n) + 0.5) / rate
    ref_s = match.ref_start_s + (middle - match.query_start_s) * match.tempo_ratio
    return AlignedTune(
        rate=rate,
        query_start_s=match.query_start_s,
        ref_start_s=match.ref_start_s,
        tempo_ratio=match.tempo_ratio,
        key_shift=match.key_shift,
        query=_read_contour(query, middle),
        reference=_read_contour(reference, ref_s),
    )


def _read_contour(contour: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """The contour's pitch at each of `seconds` (the frame holding it), 0 outside it."""
    frame = np.floor(seconds * CONTOUR_RATE).astype(np.int64)
    inside = (frame >= 0) & (frame < len(contour))
    pitch = np.rint(contour[np.clip(frame, 0, len(contour) - 1)]).astype(np.int64)
    return np.where(inside, np.clip(pitch, 0, 127), 0)


def aligned_tunes(
    index: SegmentStore, located: dict[str, list[Alignment]], contour: np.ndarray
) -> dict[str, AlignedTune | None]:
    """The aligned tune of each located track's first match, its contour read from its stored
    sequence (returned tracks only); None for a sequence stored without one (an older
    version's) or one that cannot be read."""
    ids = [tid for tid, matches in located.items() if matches]
    out: dict[str, AlignedTune | None] = {}
    for tid, data in index.sequences(ids).items():
        try:
            reference = decode_contour(data)
        except ValueError:  # a damaged sequence: no tune, the hit stands
            continue
        if reference is not None:
            out[tid] = aligned_tune(located[tid][0], contour, reference)
    return out
