"""Alignment verification: the segment distance's best candidates re-ranked by a key-invariant
alignment of chroma sequences (Qmax, `refrain.model.qmax`).

The segment embeddings see 20 s at a time and ignore temporal order beyond it; Qmax aligns
the whole frame sequences (OTI key alignment, cross-recurrence, local alignment with tempo
deviations) and needs no training. The two err differently, so the embedding's `candidates`
nearest tracks of each query are re-ranked by a fusion of both:

    fused = z(-distance) + weight * z(log(1 + Qmax))

where z standardises over the query's candidates (mean 0, standard deviation 1), which
makes the two scales comparable whatever the clip's length and the catalog. Tracks beyond
the candidates keep the embedding's order after them, so verification changes the order of
the top of a list and never what the embedding put below it. `weight` 0 is the embedding's
ranking. `Fusion.fit` picks the weight that maximises MAP on validation queries. Only the
shortlisted pairs are aligned, `candidates` per query whatever the catalog's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from refrain.model.metrics import retrieval_metrics

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # searched by `Fusion.fit`
SWEEP_CANDIDATES = (10, 20, 50, 100, 200)  # shortlist sizes `refrain evaluate --verify-sweep` tries
BELOW = 1e6  # added to the distance of tracks outside the candidates: they stay below them

# (query row, candidate columns) -> Qmax of each pair
PairQmax = Callable[[int, np.ndarray], np.ndarray]


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


@dataclass(frozen=True)
class Fusion:
    # chosen on the arrangement corpus's validation split (345 versions of 115 tunes), for the
    # shipped model (stage 6): MAP 0.669 -> 0.681 (track) and 0.428 -> 0.434 (10 s clips) with
    # these; 50 candidates gave 0.684 and 0.433 at two and a half times the cost; weights
    # 0.25-0.75 within 0.01 of the best
    candidates: int = 20  # the embedding's nearest tracks re-ranked per query
    weight: float = 0.5  # of the alignment against the segment distance

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ValueError(f"expected at least 2 candidates, got {self.candidates!r}")
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"expected a non-negative weight, got {self.weight!r}")

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "weight": self.weight}

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        return cls(int(d["candidates"]), float(d["weight"]))

    @staticmethod
    def standard_scores(qmax: np.ndarray) -> np.ndarray:
        """The alignment's term of one query's candidates: log(1 + Qmax) standardised over
        them. A NaN Qmax (no sequence stored) counts as the candidates' median."""
        q = np.log1p(np.asarray(qmax, dtype=np.float64))
        if np.isnan(q).any():
            q = np.where(np.isnan(q), np.nanmedian(q) if (~np.isnan(q)).any() else 0.0, q)
        return _z(q)

    def fuse(self, dist: np.ndarray, qmax: np.ndarray) -> np.ndarray:
        """Fused scores of one query's candidates (higher is closer) from their distances and
        Qmax scores (`standard_scores`)."""
        return _z(-np.asarray(dist, dtype=np.float64)) + self.weight * self.standard_scores(qmax)

    def shortlist(self, dist: np.ndarray) -> list[np.ndarray]:
        """Per query row, the columns of its `candidates` smallest finite distances."""
        out = []
        for row in np.asarray(dist, dtype=np.float64):
            top = np.argsort(row, kind="stable")[: self.candidates]
            out.append(top[np.isfinite(row[top])])
        return out

    def rerank(
        self, dist: np.ndarray, qmax: Sequence[np.ndarray], shortlist: Sequence[np.ndarray]
    ) -> np.ndarray:
        """A (Q, C) matrix ranking like the fusion: lower is closer. `qmax[i]` holds the Qmax
        of row i's `shortlist[i]` columns, in that order; infinite distances stay infinite."""
        dist = np.asarray(dist, dtype=np.float64)
        out = dist + BELOW
        for i, (cols, q) in enumerate(zip(shortlist, qmax, strict=True)):
            if len(cols):
                out[i, cols] = -self.fuse(dist[i, cols], q)
        return out

    @classmethod
    def fit(
        cls,
        dist: np.ndarray,
        qmax: Sequence[np.ndarray],
        shortlist: Sequence[np.ndarray],
        query_labels: np.ndarray,
        cand_labels: np.ndarray,
        query_ids: np.ndarray | None = None,
        cand_ids: np.ndarray | None = None,
        candidates: int = 20,
        weights: Sequence[float] = WEIGHTS,
    ) -> tuple[Fusion, dict[float, float]]:
        """The weight with the best MAP on these (validation) queries, and MAP per weight."""
        scores = {}
        for w in weights:
            fused = cls(candidates, w).rerank(dist, qmax, shortlist)
            scores[w] = retrieval_metrics(fused, query_labels, cand_labels, query_ids, cand_ids)[
                "MAP"
            ]
        best = max(scores, key=lambda w: (scores[w], -w))
        return cls(candidates, best), scores
