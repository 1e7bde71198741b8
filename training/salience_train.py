"""Training the tune-salience network on a labelled CQT cache (`refrain.training.tune_cache`).

    refrain salience train runs/salience/cache.npz --out runs/salience --steps 3000

Each step draws `batch` crops of `frames` frames from the cache's training versions, shifts
each crop and its labels by a random number of semitones (the tune moves with the audio) and
its level by a random number of decibels, and minimises the cross-entropy of the 85-way
answer per frame (no tune, or one of 84 semitones). Every `every` steps it measures the
validation versions (`refrain.training.melody_eval`), writes `last/` (the network, the
optimiser and the step: an interrupted run resumes from it) and keeps the network with the
best validation overall accuracy in `best/`, which `TuneSalience` loads.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from refrain.model.salience import BINS, LOWEST_MIDI, SalienceConfig, SalienceNet, save
from refrain.training.tune_cache import TuneCache


@dataclass(frozen=True)
class SalienceOptions:
    steps: int = 3000
    batch: int = 16
    frames: int = 256  # about 10 s at 25 frames per second
    lr: float = 2e-3
    every: int = 250  # steps between validations and checkpoints
    channels: int = 16
    max_shift: int = 4  # semitones of random transposition each way
    max_gain_db: float = 12.0  # random level change each way, in decibels
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


def targets(labels: np.ndarray) -> np.ndarray:
    """MIDI pitches (0 for none) -> class indices: 0 no tune, 1 + k the CQT's bin k."""
    y = labels.astype(np.int64) - LOWEST_MIDI + 1
    return np.where((labels == 0) | (y < 1) | (y > BINS), 0, y)


def learning_rate(step: int, options: SalienceOptions) -> float:
    """A linear warm-up over the first tenth of the steps, then a cosine decay to zero: a
    function of the step alone, so that a resumed run (with more steps, even) goes on."""
    warm = max(1, options.steps // 10)
    if step < warm:
        return options.lr * (step + 1) / warm
    return options.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, options.steps - warm)))


class Batches:
    """Random labelled crops of a cache's training versions, transposed and re-levelled."""

    def __init__(self, cache: TuneCache, indices: list[int], options: SalienceOptions) -> None:
        self.cache, self.options = cache, options
        lengths = np.diff(cache.starts)[indices]
        keep = lengths >= options.frames
        self.indices = np.asarray(indices)[keep]
        if not len(self.indices):
            raise ValueError(f"no training version holds {options.frames} frames")
        self.weights = lengths[keep] / lengths[keep].sum()
        self.rng = np.random.default_rng(options.seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        o, rng = self.options, self.rng
        feats = np.empty((o.batch, BINS, o.frames), np.float32)
        ys = np.empty((o.batch, o.frames), np.int64)
        for b, k in enumerate(rng.choice(self.indices, o.batch, p=self.weights)):
            a = int(self.cache.starts[k])
            start = a + int(rng.integers(0, self.cache.starts[k + 1] - a - o.frames + 1))
            x = self.cache.feats[start : start + o.frames].T.astype(np.float32) / 255
            y = targets(self.cache.labels[start : start + o.frames])
            shift = int(rng.integers(-o.max_shift, o.max_shift + 1))
            x = np.roll(x, shift, axis=0)
            if shift > 0:
                x[:shift] = 0
            elif shift < 0:
                x[shift:] = 0
            y = np.where(y > 0, y + shift, 0)
            y = np.where((y < 1) | (y > BINS), 0, y)  # shifted off the CQT: counted as none
            gain = rng.uniform(-o.max_gain_db, o.max_gain_db) / 80.0
            feats[b] = np.clip(x + gain * (x > 0), 0.0, 1.0)
            ys[b] = y
        return torch.from_numpy(feats), torch.from_numpy(ys)


def train_salience(
    cache_path: str | os.PathLike,
    out: str | os.PathLike,
    options: SalienceOptions = SalienceOptions(),
    progress: bool = True,
) -> dict:
    """Train (or resume) a salience network; returns the run's history."""
    from refrain.training.melody_eval import evaluate_melody

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    cache = TuneCache.load(cache_path)
    train, valid = cache.select("train"), cache.select("valid")
    if not train:
        raise ValueError(f"{cache_path} holds no training versions")
    net = SalienceNet(SalienceConfig(channels=options.channels)).to(options.device)
    opt = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=1e-4)
    history: dict = {"options": asdict(options), "evals": [], "best": None}
    step = 0
    state_path = out / "last" / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=options.device, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
    batches = Batches(
        cache, train, SalienceOptions(**{**asdict(options), "seed": options.seed + step})
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.02)
    bar = tqdm(
        total=options.steps, initial=step, desc="salience", unit="step", disable=not progress
    )
    started, losses = time.perf_counter(), []
    while step < options.steps:
        net.train()
        x, y = batches()
        logits = net(x.to(options.device))
        loss = loss_fn(logits.reshape(-1, BINS + 1), y.to(options.device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, options)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if step % options.every == 0 or step == options.steps:
            net.eval()
            metrics = evaluate_melody(net, cache, valid) if valid else {}
            overall = metrics.get("all", {}).get("overall_accuracy", float("nan"))
            entry = {
                "step": step,
                "loss": float(np.mean(losses[-options.every :])),
                "seconds": round(time.perf_counter() - started, 1),
                "valid": metrics,
            }
            history["evals"].append(entry)
            best = history["best"]
            if best is None or not overall <= best["overall_accuracy"]:
                history["best"] = {"step": step, "overall_accuracy": overall}
                save(net.cpu(), out / "best")
                net.to(options.device)
            save(net.cpu(), out / "last")
            net.to(options.device)
            tmp = state_path.with_name(".state.pt.tmp")
            torch.save(
                {
                    "net": net.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "history": history,
                },
                tmp,
            )
            os.replace(tmp, state_path)
            (out / "history.json").write_text(json.dumps(history, indent=1))
            bar.write(f"step {step}: loss {entry['loss']:.3f}, valid overall {overall:.3f}")
    bar.close()
    return history
