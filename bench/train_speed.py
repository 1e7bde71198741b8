"""Training throughput: segments per second of the shipped model's training, on CPU or GPU.

Two figures per setting, measured in one process:

- **step**: forward, loss, backward and an Adam step on ready batches (random pooled-CQT
  segments of the training shape, already on the device): what the network itself costs;
- **loop**: `refrain.training.train.train` for a few epochs on synthetic audio tracks
  (bench/embed.py's chords, bass and noise), so that the batch sampler's crops and
  augmentations (CPU, in the training process) count too. The figure is the trainer's own
  `segments_per_s` of the last epoch (training steps only, validation left out); the first
  epoch, which warms the device up, is not used.

The model, data, loss and augmentation settings come from a training config (by default the
shipped model's last stage, configs/stage10-mix.yaml); `--width` scales every channel count
(a wider network), `--works-per-batch` takes a list. Synthetic audio: the time of a step does
not depend on what the music is.

    python bench/train_speed.py                               # CPU, the config's threads
    python bench/train_speed.py --device cuda --works-per-batch 16,32,64 --width 1,2
    python bench/train_speed.py --no-loop --amp bf16 --device cuda   # bf16 autocast steps
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from refrain.model.config import ModelConfig
from refrain.model.network import CLEWSNet
from refrain.training.batches import cqt_frames
from refrain.training.losses import contrastive_loss
from refrain.training.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from embed import synth_track  # bench/ is not a package


def widened(model: ModelConfig, factor: float) -> ModelConfig:
    """`model` with every convolution channel count times `factor` (the embedding size kept)."""
    if factor == 1:
        return model
    d = model.to_dict()
    d["frontend"]["channels"] = [round(c * factor) for c in d["frontend"]["channels"]]
    d["backbone"]["channels"] = [round(c * factor) for c in d["backbone"]["channels"]]
    return ModelConfig.from_dict(d)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def crop_segments(config: RunConfig) -> int:
    """Segments in one training crop (as `BatchSampler` cuts them)."""
    return max(1, round(config.data.crop_s / config.model.shingling.len))


def step_speed(
    config: RunConfig, device: torch.device, steps: int, amp: str | None
) -> tuple[float, float]:
    """Segments per second of the training step alone, and the peak device memory (GiB)."""
    c = config.model
    torch.manual_seed(0)
    net = CLEWSNet(c)
    works = config.training.works_per_batch
    per_work = config.data.versions_per_work
    n_seg = crop_segments(config)
    with torch.no_grad():
        _, bins, frames = net.spectrogram(torch.zeros(1, c.sample_rate * c.shingling.len)).shape
    assert frames == cqt_frames(c, c.shingling.len), (frames, cqt_frames(c, c.shingling.len))
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    b = works * per_work
    batches = [torch.rand(b * n_seg, bins, frames, device=device) for _ in range(4)]
    labels = torch.arange(works, device=device).repeat_interleave(per_work)
    ids = torch.arange(b, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")

    def one(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = net(x).reshape(b, n_seg, c.zdim)
            loss, _ = contrastive_loss(z.float(), labels, ids, config.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(3):  # warm-up: kernels chosen, memory pools filled
        one(batches[i % 4])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        one(batches[i % 4])
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return steps * b * n_seg / seconds, peak


def synth_manifest(folder: Path, works: int, versions: int, seconds: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in range(works):
        for v in range(versions):
            path = folder / f"w{w:03d}v{v}.flac"
            if not path.exists():
                synth_track(path, seconds, seed=1000 * w + v, sr=16000)
            split = "valid" if w < 2 else "train"
            rows.append({"clique": f"w{w:03d}", "path": path.name, "split": split})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["clique", "path", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def loop_speed(config: RunConfig, work: Path, epochs: int, steps: int, prefetch: int) -> float:
    """The trainer's segments per second in its last epoch."""
    out = work / f"run-{time.monotonic_ns()}"
    tc = replace(
        config.training,
        out=str(out),
        epochs=epochs,
        steps_per_epoch=steps,
        init="",
        max_minutes=0.0,
        prefetch=prefetch,
    )
    train(replace(config, training=tc))
    history = json.loads((out / "history.json").read_text())
    return float(history[-1]["segments_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/stage10-mix.yaml"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the config's)")
    p.add_argument("--works-per-batch", default="", help="comma list (default: the config's)")
    p.add_argument("--width", default="1", help="comma list of channel factors")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (step only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of the step figure")
    p.add_argument("--no-loop", action="store_true", help="the step figure only")
    p.add_argument("--loop-epochs", type=int, default=2)
    p.add_argument(
        "--prefetch", default="2", help="comma list of the trainer's prefetch depths (0: none)"
    )
    p.add_argument("--loop-steps", type=int, default=10, help="steps per epoch of the loop")
    p.add_argument(
        "--tracks",
        type=int,
        default=24,
        help="synthetic works, 3 versions each (at least 2 more than the largest batch)",
    )
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = RunConfig.load(args.config)
    device = torch.device(args.device)
    threads = args.threads or base.training.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="refrain-train-speed-"))
    wpb = [int(v) for v in args.works_per_batch.split(",") if v] or [base.training.works_per_batch]
    manifest = None
    if not args.no_loop:
        seconds = max(base.data.crop_s, base.model.shingling.len) + 5
        # two validation works, and enough training works to fill the largest batch
        works = max(args.tracks, max(wpb) + 2)
        manifest = synth_manifest(work / "audio", works, 3, seconds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    print(f"torch {torch.__version__}, {args.device} ({name}), config {Path(args.config).name}")
    header = (
        f"{'width':>5} {'works/batch':>11} {'segments':>8} {'params M':>8} {'step seg/s':>10} "
        f"{'prefetch':>8} {'loop seg/s':>10} {'loop/step':>9} {'peak GiB':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for factor in [float(v) for v in args.width.split(",")]:
        for works in wpb:
            model = widened(base.model, factor)
            data = replace(base.data, manifest=str(manifest or ""), cache=str(work / "cqt"))
            tc = replace(base.training, works_per_batch=works, device=args.device)
            config = replace(base, model=model, data=data, training=tc)
            n_seg = works * base.data.versions_per_work * crop_segments(config)
            params = sum(t.numel() for t in CLEWSNet(model).parameters()) / 1e6
            step, peak = step_speed(config, device, args.steps, args.amp)
            for depth in [int(v) for v in args.prefetch.split(",")] if manifest else [-1]:
                loop = float("nan")
                if manifest is not None:
                    loop = loop_speed(config, work, args.loop_epochs, args.loop_steps, depth)
                rows.append(
                    {"width": factor, "works_per_batch": works, "segments": n_seg}
                    | {"params_m": params, "step_seg_s": step, "prefetch": depth}
                    | {"loop_seg_s": loop, "peak_gib": peak, "amp": args.amp}
                )
                print(
                    f"{factor:5.2f} {works:11d} {n_seg:8d} {params:8.2f} {step:10.1f} "
                    f"{depth if depth >= 0 else '-':>8} {loop:10.1f} {loop / step:9.2f} "
                    f"{peak:8.2f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
