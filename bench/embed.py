"""Embedding throughput: Refrain's `embed_many` against a literal per-file loop.

The literal loop does what the reference inference script does for each file: decode,
cut shingles at a 5 s hop, one nnAudio CQT per shingle, one network call with all
the file's shingles. Both run on the same synthetic FLAC files in one process;
figures are seconds of audio embedded per wall-clock second.

    python bench/embed.py                       # fixture-A model and full DiscogsVI size
    python bench/embed.py --models A --tracks 32
    python bench/embed.py --models default,stage7 --tracks 8   # the shipped depth vs stage 7's
    python bench/embed.py --models default --device cuda --precision bfloat16

"default" is the shipped model; "stage7" the same network at stage 7's depth (one residual
block per stage, `configs/default-stage7.yaml`), random weights: the time does not depend on
them. The "one 30 s clip" row is a query's embedding cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

from refrain.model import load_model
from refrain.model.audio import load_audio
from refrain.model.config import ModelConfig
from refrain.model.embedder import Embedder
from refrain.model.network import CLEWSNet
from refrain.model.shingle import cut_shingles

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_A = ROOT / "tests/data/clews-official-A/checkpoint_best.ckpt"


def synth_track(path: Path, seconds: float, seed: int, sr: int = 44100) -> None:
    """A stereo track of chords, bass and noise, written as FLAC."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = np.zeros(n)
    beat = 60 / rng.uniform(70, 140)
    roots = rng.integers(40, 52, size=int(seconds / (4 * beat)) + 2)
    for i, root in enumerate(roots):
        a, b = int(i * 4 * beat * sr), min(n, int((i + 1) * 4 * beat * sr))
        for interval in (0, 4, 7, 12):
            f = 440 * 2 ** ((root + interval - 69) / 12)
            x[a:b] += np.sin(2 * np.pi * f * t[a:b]) * 0.1
    x += 0.003 * rng.standard_normal(n)
    stereo = np.stack([x, 0.8 * x + 0.002 * rng.standard_normal(n)], axis=1)
    sf.write(path, (0.8 * stereo / np.abs(stereo).max()).astype(np.float32), sr, subtype="PCM_16")


def literal_loop(model: Embedder, files: list[Path], hop: float) -> list[np.ndarray]:
    net = model.net
    length = int(model.sample_rate * model.config.shingling.len)
    out = []
    with torch.inference_mode():
        for f in files:
            x = torch.from_numpy(load_audio(f)).to(model.device)
            shingles = cut_shingles(x, length, int(model.sample_rate * hop), length)
            with torch.autocast(
                model.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32
            ):
                z = net(net.spectrogram(shingles))
            out.append(z.float().cpu().numpy())
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def make_models(names: list[str], device: str = "cpu") -> dict[str, Embedder]:
    models = {}
    for name in names:
        if name == "A":
            models["fixture-A (zdim 128)"] = load_model(FIXTURE_A, device=device)
        elif name == "default":
            models["shipped default (zdim 256)"] = load_model(device=device)
        elif name == "stage7":
            conf = yaml.safe_load((ROOT / "configs/default-stage7.yaml").read_text())["model"]
            torch.manual_seed(0)
            net = CLEWSNet(ModelConfig.from_dict(conf)).eval()
            models["stage 7 depth (zdim 256)"] = Embedder(net, device=device)
        elif name == "full":
            torch.manual_seed(0)
            net = CLEWSNet(ModelConfig()).eval()  # DiscogsVI sizes, random weights
            models["DiscogsVI size (zdim 1024)"] = Embedder(net, device=device)
        else:
            raise SystemExit(f"unknown model {name!r}: expected A, default, stage7 or full")
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="A,full", help="comma list of A (fixture), default, stage7 and full"
    )
    p.add_argument("--tracks", type=int, default=32, help="tracks of 2-5 min in the batch workload")
    p.add_argument("--full-tracks", type=int, default=None, help="override --tracks for 'full'")
    p.add_argument("--hop", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2, help="alternating runs per method (min kept)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--precision", default="float32", help="float32, or bfloat16/float16 autocast (CUDA)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="refrain-bench-"))
    one = tmp / "track4min.flac"
    synth_track(one, 240.0, args.seed)
    clip = tmp / "clip30s.flac"
    synth_track(clip, 30.0, args.seed + 10_000)
    lengths = rng.uniform(120, 300, size=args.tracks)
    many = []
    for i, seconds in enumerate(lengths):
        many.append(tmp / f"t{i:03d}.flac")
        synth_track(many[-1], seconds, args.seed + 1 + i)

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), {args.precision}, hop {args.hop} s")
    header = (
        f"{'model':<27} {'workload':<22} {'audio s':>8} {'loop s':>8} {'refrain s':>9} "
        f"{'loop x/s':>9} {'refrain x/s':>11} {'speedup':>8} {'max|diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, model in make_models(args.models.split(","), args.device).items():
        model.set_precision(args.precision)
        n = args.full_tracks if (args.full_tracks and "1024" in name) else args.tracks
        workloads = [
            ("one 30 s clip", [clip], 30.0),
            ("one 4-min track", [one], 240.0),
            (f"{n} tracks of 2-5 min", many[:n], float(lengths[:n].sum())),
        ]
        model.embed(np.zeros(16000, dtype=np.float32) + 0.01)  # warm up
        for label, files, seconds in workloads:
            # Alternate the two methods and keep each one's fastest run: this machine's
            # load drifts, and a drift should not favour whichever ran second.
            t_loop = t_ref = float("inf")
            for _ in range(args.repeat):
                t, z_loop = timed(lambda m=model, f=files: literal_loop(m, f, args.hop))
                t_loop = min(t_loop, t)
                t, z_ref = timed(lambda m=model, f=files: m.embed_many(f, hop=args.hop))
                t_ref = min(t_ref, t)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(z_loop, z_ref, strict=False))
            print(
                f"{name:<27} {label:<22} {seconds:8.0f} {t_loop:8.2f} {t_ref:9.2f} "
                f"{seconds / t_loop:9.1f} {seconds / t_ref:11.1f} {t_loop / t_ref:7.2f}x "
                f"{diff:10.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
