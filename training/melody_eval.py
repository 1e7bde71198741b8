"""Melody metrics of a tune-salience network, and of a training-free top line, per texture.

The metrics are `mir_eval.melody`'s, per version and then averaged over the versions of each
texture (`refrain.training.tune_cache.TEXTURES`) and over all:

- raw pitch accuracy: of the frames where the tune sounds, the share given its pitch (within
  half a semitone), whether or not they were called voiced;
- raw chroma accuracy: the same, octave errors forgiven;
- voicing recall and voicing false alarm: of the frames where the tune sounds (rests), the
  share called voiced;
- overall accuracy: the share of all frames given the right answer (rest, or the pitch).

The baseline (`top_line`) is what a training-free reading of the CQT gives: at each frame the
highest CQT peak within `threshold` of the loudest bin of that frame and above a floor, as the
tune; no peak, no tune.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from refrain.model.salience import BINS, LOWEST_MIDI, RATE, SalienceNet, melody_of
from refrain.training.tune_cache import TEXTURES, TuneCache

METRICS = (
    "raw_pitch_accuracy",
    "raw_chroma_accuracy",
    "voicing_recall",
    "voicing_false_alarm",
    "overall_accuracy",
)
Estimator = Callable[[np.ndarray], np.ndarray]  # features (frames, 84) uint8 -> MIDI per frame


def _hz(midi: np.ndarray) -> np.ndarray:
    m = np.asarray(midi, dtype=np.float64)
    return np.where(m > 0, 440.0 * 2.0 ** ((m - 69.0) / 12.0), 0.0)


def track_metrics(labels: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """`mir_eval.melody` metrics of one version: MIDI pitch per frame (0: rest), both sides at
    the salience rate."""
    import mir_eval

    times = np.arange(len(labels)) / RATE
    ref_v, ref_c, est_v, est_c = mir_eval.melody.to_cent_voicing(
        times, _hz(labels), times, _hz(estimate[: len(labels)])
    )
    m = mir_eval.melody
    out = {
        "raw_pitch_accuracy": m.raw_pitch_accuracy(ref_v, ref_c, est_v, est_c),
        "raw_chroma_accuracy": m.raw_chroma_accuracy(ref_v, ref_c, est_v, est_c),
        "overall_accuracy": m.overall_accuracy(ref_v, ref_c, est_v, est_c),
    }
    out["voicing_recall"], out["voicing_false_alarm"] = m.voicing_measures(ref_v, est_v)
    return {k: float(v) for k, v in out.items()}


def network_estimator(net: SalienceNet) -> Estimator:
    def estimate(feats: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(feats.T.astype(np.float32) / 255).unsqueeze(0)
        with torch.inference_mode():
            device = next(net.parameters()).device
            probs = torch.softmax(net(x.to(device))[0], dim=-1).cpu().numpy()
        return melody_of(probs)

    return estimate


def top_line(threshold_db: float = 20.0, floor: float = 0.35) -> Estimator:
    """The training-free baseline: the highest CQT peak within `threshold_db` of the frame's
    loudest bin and above `floor` (of the features' 0-1 range, 80 dB)."""

    def estimate(feats: np.ndarray) -> np.ndarray:
        x = feats.astype(np.float32) / 255  # (frames, 84)
        left = np.pad(x, ((0, 0), (1, 0)))[:, :-1]
        right = np.pad(x, ((0, 0), (0, 1)))[:, 1:]
        top = x.max(1, keepdims=True)
        peak = (x >= left) & (x > right) & (x >= top - threshold_db / 80.0) & (x >= floor)
        highest = BINS - 1 - np.argmax(peak[:, ::-1], axis=1)
        return np.where(peak.any(1), highest + LOWEST_MIDI, 0).astype(np.float32)

    return estimate


def evaluate_estimator(
    estimator: Estimator, cache: TuneCache, indices: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Mean metrics per texture and over all (`"all"`), with each group's version count."""
    rows: dict[str, list[dict[str, float]]] = {t: [] for t in TEXTURES}
    for k in indices:
        feats, labels = cache.track(k)
        if not (labels > 0).any():
            continue
        rows[cache.tracks[k]["texture"]].append(track_metrics(labels, estimator(feats)))
    rows["all"] = [r for t in TEXTURES for r in rows[t]]
    return {
        group: {**{m: float(np.mean([r[m] for r in rs])) for m in METRICS}, "versions": len(rs)}
        for group, rs in rows.items()
        if rs
    }


def evaluate_melody(
    net: SalienceNet, cache: TuneCache, indices: Sequence[int]
) -> dict[str, dict[str, float]]:
    return evaluate_estimator(network_estimator(net), cache, indices)


def best_top_line(
    cache: TuneCache, indices: Sequence[int]
) -> tuple[tuple[float, float], dict[str, dict[str, float]]]:
    """The baseline's (threshold_db, floor) with the best overall accuracy on `indices` (the
    validation versions), and its metrics there."""
    best: tuple[tuple[float, float], dict] | None = None
    for threshold in (6.0, 12.0, 20.0, 30.0):
        for floor in (0.25, 0.4, 0.55, 0.7):
            metrics = evaluate_estimator(top_line(threshold, floor), cache, indices)
            if (
                best is None
                or metrics["all"]["overall_accuracy"] > best[1]["all"]["overall_accuracy"]
            ):
                best = ((threshold, floor), metrics)
    assert best is not None
    return best
