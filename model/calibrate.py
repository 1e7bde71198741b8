"""Score calibration: distances -> probability that two items are versions of one work.

Fitted on validation pairs (a clip query against whole reference tracks, the way the
service searches) with a two-parameter logistic model p = sigmoid(a + b * d), and
stored in the model's metadata so that the service's `score` means something and a
threshold can be chosen.
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

    def probability(self, distance: float | np.ndarray) -> float | np.ndarray:
        z = self.a + self.b * np.asarray(distance, dtype=np.float64)
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        return float(p) if np.ndim(p) == 0 else p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def fit_logistic(distances: np.ndarray, labels: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Maximum-likelihood (a, b) of p = sigmoid(a + b d), by Newton's method, with classes
    weighted equally (negatives far outnumber positives in retrieval)."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("calibration needs both positive and negative pairs")
    scale = d.std() or 1.0
    x = np.stack([np.ones_like(d), d / scale], axis=1)
    w = np.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(x @ theta, -500, 500)))
        grad = x.T @ (w * (p - y)) + 1e-6 * theta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1] / scale)


def calibrate(
    distances: np.ndarray, labels: np.ndarray, target_precision: float = 0.9
) -> Calibration:
    """Fit the logistic map and pick the largest distance threshold whose precision on
    these pairs reaches `target_precision` (or the best-F1 one when none does)."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    a, b = fit_logistic(d, y)
    order = np.argsort(d, kind="stable")
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(y.sum()), 1)
    ok = np.nonzero(precision >= target_precision)[0]
    if len(ok):
        i = ok[-1]
    else:
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        i = int(np.argmax(f1))
    return Calibration(
        a=a, b=b, threshold=float(d[order][i]), precision=float(precision[i]),
        recall=float(recall[i]), n_positive=int(y.sum()), n_negative=int((~y).sum()),
    )


def uncalibrated_score(distance: float, gamma: float = 5.0) -> float:
    """exp(-gamma d): the similarity kernel of the CLEWS loss, in [0, 1]."""
    return math.exp(-gamma * max(distance, 0.0))
