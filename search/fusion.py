"""Alignment verification: the segment distance's best candidates re-ranked by a key-invariant
alignment of chroma sequences (Qmax, `refrain.model.qmax`).

The segment embeddings see 20 s at a time and ignore temporal order beyond it; Qmax aligns
the whole frame sequences (OTI key alignment, cross-recurrence, local alignment with tempo
deviations) and needs no training. The two err differently, so the embedding's `candidates`
nearest tracks of each query are re-ranked by a fusion of both:

    fused = -distance + weight * Qmax / query frames

Qmax per query frame is about the fraction of the query's frames that the alignment links
(the feature `refrain calibrate` fits too), so one weight serves clips of every length. Both
terms keep their own scale across queries: where the embedding separates a query's versions
by a wide margin the alignment cannot overturn it, and where all its distances are alike
(music unlike its training) the alignment decides. (Standardising both terms over each
query's candidates, as the previous release did, threw that margin away: weights above 0.5
then lost on validation queries and the shortlist could not grow.)

Tracks beyond the candidates keep the embedding's order after them, so verification changes
the order of the top of a list and never what the embedding put below it. `weight` 0 is the
embedding's ranking. `refrain.training.verified.fit_fusion` picks the weight that maximises
MAP on validation queries.
Only the shortlisted pairs are aligned, `candidates` per query whatever the catalog's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BELOW = 1e6  # added to the distance of tracks outside the candidates: they stay below them


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


@dataclass(frozen=True)
class Fusion:
    # chosen on validation works for the shipped model (stage 10): the best mean MAP over all
    # five query levels of the arrangement and even-setting corpora (168 and 339 versions), and
    # of the larger arrangement set with the even settings (888 and 339), among weights 0-6.4
    # and 10-200 candidates (`refrain evaluate --verify 200 --verify-sweep`); 200 candidates
    # gain less than 0.001 over 100 at twice the alignment cost (model card)
    candidates: int = 100  # the embedding's nearest tracks re-ranked per query
    weight: float = 2.4  # of the alignment (Qmax per query frame) against the segment distance
    expand: float = 0.5  # of the first track's own distance to the others (`expanded`)

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ValueError(f"expected at least 2 candidates, got {self.candidates!r}")
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"expected a non-negative weight, got {self.weight!r}")
        if not (np.isfinite(self.expand) and self.expand >= 0):
            raise ValueError(f"expected a non-negative expansion weight, got {self.expand!r}")

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "weight": self.weight, "expand": self.expand}

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(int(d["candidates"]), float(d["weight"]), float(d.get("expand", 0.0)))

    @staticmethod
    def standard_scores(qmax: np.ndarray) -> np.ndarray:
        """log(1 + Qmax) standardised over one query's candidates (a feature of the fused
        calibration, `refrain.training.calibrate`). A NaN Qmax (no sequence stored) counts as the
        candidates' median."""
        return _z(np.log1p(_median_filled(qmax)))

    @staticmethod
    def per_frame(qmax: np.ndarray, frames: int) -> np.ndarray:
        """Qmax per query frame of one query's candidates; a NaN Qmax (no sequence stored)
        counts as the candidates' median, so a track neither rises nor sinks for lack of one."""
        if frames < 1:
            raise ValueError(f"expected a query of at least one frame, got {frames!r}")
        return _median_filled(qmax) / frames

    def fuse(self, dist: np.ndarray, qmax: np.ndarray, frames: int) -> np.ndarray:
        """Fused scores of one query's candidates (higher is closer) from their distances, their
        Qmax and the query's length in chroma frames."""
        d = np.asarray(dist, dtype=np.float64)
        if self.weight == 0:
            return -d
        return -d + self.weight * self.per_frame(qmax, frames)

    def expanded(self, fused: np.ndarray, from_first: np.ndarray) -> np.ndarray:
        """Fused scores of one query's candidates after expansion with its first one: each
        candidate's score plus `expand` times minus its segment distance (whole track
        against whole track) to the candidate the fusion put first; `from_first` holds those
        distances, the first's own counted as 0.

        Query expansion (the first hit as a second query, as in image retrieval's average
        query expansion): a version that resembles the clip less than it resembles the
        clip's best match rises towards it. It helps where catalogs hold several versions of
        a work and the first hit is usually right, and leaves the first hit first.
        """
        f = np.asarray(fused, dtype=np.float64)
        if self.expand == 0 or len(f) < 2:
            return f
        d = np.asarray(from_first, dtype=np.float64).copy()
        d[int(np.argmax(f))] = 0.0
        return f - self.expand * np.where(np.isfinite(d), d, np.nanmax(d[np.isfinite(d)]))

    def shortlist(self, dist: np.ndarray) -> list[np.ndarray]:
        """Per query row, the columns of its `candidates` smallest finite distances."""
        out = []
        for row in np.asarray(dist, dtype=np.float64):
            top = np.argsort(row, kind="stable")[: self.candidates]
            out.append(top[np.isfinite(row[top])])
        return out

    def rerank(
        self,
        dist: np.ndarray,
        qmax: Sequence[np.ndarray],
        shortlist: Sequence[np.ndarray],
        frames: Sequence[int],
        between: np.ndarray | None = None,
    ) -> np.ndarray:
        """A (Q, C) matrix ranking like the fusion: lower is closer. `qmax[i]` holds the Qmax
        of row i's `shortlist[i]` columns, in that order, and `frames[i]` the length of its
        query; `between` (C, C), the candidates' whole-track distances to each other, is
        needed when `expand` > 0. Infinite distances stay infinite."""
        dist = np.asarray(dist, dtype=np.float64)
        if self.expand and between is None:
            raise ValueError("expansion needs the candidates' distances to each other")
        out = dist + BELOW
        for i, (cols, q, n) in enumerate(zip(shortlist, qmax, frames, strict=True)):
            if len(cols):
                fused = self.fuse(dist[i, cols], q, n)
                if self.expand:
                    first = cols[int(np.argmax(fused))]
                    fused = self.expanded(fused, np.asarray(between)[first, cols])
                out[i, cols] = -fused
        return out


def _median_filled(qmax: np.ndarray) -> np.ndarray:
    q = np.asarray(qmax, dtype=np.float64)
    if np.isnan(q).any():
        q = np.where(np.isnan(q), np.nanmedian(q) if (~np.isnan(q)).any() else 0.0, q)
    return q
