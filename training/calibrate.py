"""Score calibration: distances -> probability that two items are versions of one work.

Fitted on validation pairs (a clip query against whole reference tracks, the way the
service searches) with a two-parameter logistic model p = sigmoid(a + b * d), and
stored in the model's metadata so that the service's `score` means something and a
threshold can be chosen.

With alignment verification, the pairs the service would align (each clip's `candidates`
nearest tracks by distance) also carry two alignment features: v, the Qmax of the clip's
chroma against the reference's (`refrain.model.align`) per query frame (about the fraction of
the clip's frames the alignment links), and z, that pair's log Qmax standardised over the
clip's candidates, the term the verification's ranking uses (`refrain.search.fusion`). A
second model p = sigmoid(a + b d + c v + e z) is fitted on those pairs
(`Calibration.fused`) and kept when, with the distance model scoring every other pair, it
separates versions better than the distance alone: the service then scores the tracks it
aligned with it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from refrain.model.calibration import Calibration

if TYPE_CHECKING:
    from refrain.model.embedder import Embedder
    from refrain.training.evaluate import Item

log = logging.getLogger(__name__)


def fit_logistic(
    distances: np.ndarray, labels: np.ndarray, iters: int = 100
) -> tuple[float, float]:
    """Maximum-likelihood (a, b) of p = sigmoid(a + b d), by Newton's method, with classes
    weighted equally (negatives far outnumber positives in retrieval)."""
    a, (b,) = fit_logistic_features(np.asarray(distances, dtype=np.float64)[:, None], labels, iters)
    return a, b


def fit_logistic_features(
    features: np.ndarray, labels: np.ndarray, iters: int = 100
) -> tuple[float, list[float]]:
    """Maximum-likelihood (a, [b_1..b_k]) of p = sigmoid(a + sum b_i x_i) for (n, k) features,
    by Newton's method on standardised features, the classes weighted equally."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("calibration needs both positive and negative pairs")
    scale = np.where(x.std(0) > 0, x.std(0), 1.0)
    x = np.concatenate([np.ones((len(x), 1)), x / scale], axis=1)
    w = np.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    theta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(x @ theta, -500, 500)))
        grad = x.T @ (w * (p - y)) + 1e-6 * theta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), [float(t) for t in theta[1:] / scale]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / max(precision + recall, 1e-12)


def _operating_point(
    score: np.ndarray, y: np.ndarray, target_precision: float | None
) -> tuple[float, float, float]:
    """(threshold, precision, recall) over pairs ranked by `score` ascending (closest first):
    the largest threshold whose precision reaches `target_precision`, else the best F1."""
    order = np.argsort(score, kind="stable")
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(y.sum()), 1)
    ok = np.nonzero(precision >= target_precision)[0] if target_precision else np.zeros(0, int)
    if len(ok):
        i = ok[-1]
    else:
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        i = int(np.argmax(f1))
    return float(score[order][i]), float(precision[i]), float(recall[i])


def calibrate(
    distances: np.ndarray,
    labels: np.ndarray,
    target_precision: float | None = None,
    alignments: np.ndarray | None = None,
    relative: np.ndarray | None = None,
) -> Calibration:
    """Fit the logistic map and pick an operating threshold: the largest distance whose
    precision on these pairs reaches `target_precision`, or the best-F1 one (None, or when
    no threshold reaches the target).

    With `alignments` (each pair's Qmax per query frame) and `relative` (its standardised
    log Qmax among the clip's candidates), both NaN for the pairs verification would not
    align, the fused model is fitted on the aligned pairs. Its operating point is chosen on
    the log-odds of every pair: the fused model's where a pair is aligned, the distance
    model's elsewhere. It is kept if its F1 there beats the distance model's."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    a, b = fit_logistic(d, y)
    threshold, precision, recall = _operating_point(d, y, target_precision)
    fused = None
    if alignments is not None:
        v = np.asarray(alignments, dtype=np.float64)
        z = np.zeros_like(v) if relative is None else np.asarray(relative, dtype=np.float64)
        on = np.isfinite(v) & np.isfinite(z)
        if y[on].any() and not y[on].all():
            fa, (fb, fc, fe) = fit_logistic_features(np.stack([d, v, z], axis=1)[on], y[on])
            # Both models weigh their classes equally, so their log-odds are likelihood
            # ratios, the fused one among the aligned pairs only. Being aligned is evidence
            # itself (versions are shortlisted far more often than other works): adding its
            # log-ratio puts the fused log-odds on the distance model's scale, over all pairs.
            fa += math.log((y[on].sum() / y.sum()) / ((~y[on]).sum() / (~y).sum()))
            logit = a + b * d
            logit[on] = fa + fb * d[on] + fc * v[on] + fe * z[on]
            t, p, r = _operating_point(-logit, y, target_precision)
            # kept only where it separates these pairs better than the distance alone (F1 at
            # each model's operating point): otherwise aligned tracks keep the distance's score
            kept = _f1(p, r) > _f1(precision, recall)
            log.info(
                "fused model on %d aligned pairs: precision %.3f recall %.3f (F1 %.3f) against "
                "the distance's %.3f / %.3f (F1 %.3f): %s",
                on.sum(),
                p,
                r,
                _f1(p, r),
                precision,
                recall,
                _f1(precision, recall),
                "kept" if kept else "not kept",
            )
            if kept:
                fused = {
                    "a": fa,
                    "b": fb,
                    "c": fc,
                    "e": fe,
                    "threshold": -t,
                    "precision": p,
                    "recall": r,
                    "aligned_pairs": int(on.sum()),
                }
    return Calibration(
        a=a,
        b=b,
        threshold=threshold,
        precision=precision,
        recall=recall,
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        fused=fused,
    )


def validation_pairs(
    model: Embedder,
    items: Sequence[Item],
    query_seconds: Sequence[float] = (5.0, 10.0, 20.0, 30.0),
    seed: int = 0,
    hop: float = 5.0,
    alignment: bool = False,
    candidates: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Distances and labels of clip-vs-track pairs, measured the way the service searches:
    a clip of tau seconds (seeded offset) against every other whole track, reduced with
    `min` (the reduction for clips under 40 s). Items are `refrain.training.evaluate.Item`s.

    With `alignment`, also the two alignment features of the pairs the service would align
    (the clip's `candidates` nearest tracks, `Fusion`'s default when None), from the chroma
    sequences it stores and reads (`model.sequence`, `model.align`): Qmax per query frame
    and the standardised log Qmax among those candidates; NaN for the other pairs."""
    import torch

    from refrain.model.reduce import track_distance
    from refrain.search.fusion import Fusion

    fusion = Fusion() if candidates is None else Fusion(candidates)

    rng = np.random.default_rng(seed)
    sr = model.sample_rate
    waves = []
    for item in items:
        assert item.path is not None, "validation tracks are files of a manifest"
        waves.append(model.waveform(item.path).numpy())
    refs = model.embed_many(waves, hop=hop)
    width = max(len(r) for r in refs)
    c = torch.zeros(len(refs), width, refs[0].shape[1])
    cmask = torch.ones(len(refs), width, dtype=torch.bool)
    for i, r in enumerate(refs):
        c[i, : len(r)] = torch.from_numpy(r)
        cmask[i, : len(r)] = False
    cliques = np.array([item.clique for item in items])
    if alignment:
        from refrain.model.align import plots
        from refrain.model.sequence import TUNE, Chromagram, decode_tune

        chromagram = Chromagram(model.config)  # the tune chroma, as verification aligns it
        sequences = [decode_tune(chromagram.reference(w)) for w in waves]
    distances, labels, aligned, relative = [], [], [], []
    for tau in query_seconds:
        clips = []
        for w in waves:
            n = int(tau * sr)
            start = int(rng.integers(0, max(1, len(w) - n + 1)))
            clips.append(w[start : start + n])
        for i, q in enumerate(model.embed_many(clips, hop=hop)):
            d = track_distance(torch.from_numpy(q)[None], c, "min", cmask=cmask)[0].numpy()
            others = np.arange(len(items)) != i
            distances.append(d[others])
            labels.append(cliques[others] == cliques[i])
            if alignment:
                (top,) = fusion.shortlist(d[others][None])
                cols = np.nonzero(others)[0][top]
                chroma = chromagram.query(clips[i]).tune
                assert chroma is not None  # the chromagram reads the tune
                qmax = plots(chroma, [sequences[c] for c in cols], TUNE).qmax()
                v = np.full(int(others.sum()), np.nan)
                z = v.copy()
                v[top] = qmax / len(chroma)
                z[top] = fusion.standard_scores(qmax)
                aligned.append(v)
                relative.append(z)
    if alignment:
        return tuple(np.concatenate(x) for x in (distances, labels, aligned, relative))
    return np.concatenate(distances), np.concatenate(labels)


def calibrate_model(
    model_dir: str | os.PathLike[str],
    manifest: str | Path,
    split: str = "valid",
    target_precision: float | None = None,
    seed: int = 0,
) -> Calibration:
    """Fit the calibration of a Refrain model folder on a manifest split; stored in place."""
    from refrain.model import load_model
    from refrain.model.checkpoint import save_refrain
    from refrain.training.evaluate import read_manifest

    model = load_model(model_dir)
    if model.info.get("format") != "refrain":
        raise ValueError("calibration is stored in Refrain's format: convert the checkpoint first")
    d, y, v, z = validation_pairs(
        model, read_manifest(manifest, split=split), seed=seed, alignment=True
    )
    cal = calibrate(d, y, target_precision, alignments=v, relative=z)
    keep = {
        k: v
        for k, v in model.info.items()
        if k
        not in (
            "format",
            "format_version",
            "weights_sha256",
            "zdim",
            "shingle_len_s",
            "sample_rate",
            "path",
        )
    }
    save_refrain(model.net, Path(model_dir), extra={**keep, "calibration": cal.to_dict()})
    return cal
