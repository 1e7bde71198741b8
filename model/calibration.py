"""Scores a person can read: a model's calibration turns a distance (and, for the tracks that
verification aligned, the alignment's features) into the probability that two items are
versions of one work; without one, `uncalibrated_score` maps a distance into [0, 1].

The calibration is fitted on validation pairs by `refrain calibrate`
(`refrain.training.calibrate`) and stored in the model's metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    a: float  # intercept
    b: float  # slope on the distance (negative: closer is likelier)
    threshold: float  # distance at the chosen operating point
    precision: float  # on the fitting pairs, at the threshold
    recall: float
    n_positive: int
    n_negative: int
    method: str = "logistic"
    # the model with alignment: {"a", "b", "c", "threshold" (on the logit), "precision",
    # "recall"}; None when the calibration was fitted without it
    fused: dict | None = None

    def probability(self, distance: float | np.ndarray) -> float | np.ndarray:
        z = self.a + self.b * np.asarray(distance, dtype=np.float64)
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        return float(p) if np.ndim(p) == 0 else p

    def fused_probability(self, distance: float, alignment: float, relative: float) -> float:
        """With alignment verification: `alignment` is the pair's Qmax per query frame,
        `relative` its standardised log Qmax among the query's candidates."""
        if self.fused is None:
            return float(self.probability(distance))
        f = self.fused
        # a fused model stored before the relative feature has no "e": it did without it
        z = f["a"] + f["b"] * distance + f["c"] * alignment + f.get("e", 0.0) * relative
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)


def uncalibrated_score(distance: float, gamma: float = 5.0) -> float:
    """exp(-gamma d): the similarity kernel of the CLEWS loss, in [0, 1]."""
    return math.exp(-gamma * max(distance, 0.0))
