"""Does trying the query in several keys help? Segment queries with and without transpositions.

Every track of a manifest split is a reference (embedded at a 5 s hop). From every track a
clip is cut at a seeded position and queried three ways: as it is, pitch-shifted in the
audio domain (a random 1-4 semitones up or down, tempo kept; ffmpeg's asetrate + atempo),
and time-stretched (x0.85 or x1.15). Each query is ranked against the references with the
`min` reduction, once as it is and once trying the key shifts -n..+n (the service's
`transpositions` parameter), and two figures are printed for each:

- versions MAP: the other versions of the clip's work are relevant, its own source track is
  left out (the paper's protocol; the corpus versions are themselves transposed up to +-6);
- source top-1: the clip's own source track is in the references; the top hit is the
  source or another version of the same work.

    python bench/transpose.py --manifest corpus/manifest.csv --split test --clip 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from refrain.model import load_model
from refrain.model.embedder import transposed
from refrain.model.reduce import nsqeuc
from refrain.search.ranking import key_shifts
from refrain.training.evaluate import read_manifest
from refrain.training.retrieval_metrics import average_precision

import helpers


def pitch_shift(x: np.ndarray, semitones: int, sr: int) -> np.ndarray:
    return helpers.pitch_shift(x[:, None], semitones, sr)[:, 0]


def time_stretch(x: np.ndarray, rate: float, sr: int) -> np.ndarray:
    return helpers.time_stretch(x[:, None], rate, sr)[:, 0]


def query_distances(model, wave: torch.Tensor, refs: list[torch.Tensor], shifts) -> np.ndarray:
    """min-reduced distance of a clip to every reference, the best over `shifts`."""
    cqt = model.spectrogram(wave, 5.0)
    z = model.embed_spectrograms(transposed(cqt, shifts))
    n = len(cqt)
    out = np.empty(len(refs))
    for r, ref in enumerate(refs):
        d = nsqeuc(z, ref)  # (len(shifts) * n, R)
        out[r] = float(d.reshape(len(shifts), n, -1).amin(dim=(1, 2)).min())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--manifest", default="corpus/manifest.csv")
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("--clip", type=float, default=10.0, help="query length in seconds")
    p.add_argument("--transpositions", type=int, default=6, help="semitones tried either way")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = load_model(args.checkpoint)
    sr = model.sample_rate
    items = read_manifest(args.manifest, split=args.split)
    cliques = np.array([it.clique for it in items])
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    waves = [model.waveform(it.path) for it in items]
    refs = [torch.from_numpy(z) for z in model.embed_many(list(waves), hop=5.0)]
    print(
        f"{len(items)} tracks of {len(set(cliques))} works embedded in "
        f"{time.monotonic() - t0:.0f} s",
        flush=True,
    )

    semitones = [-4, -3, -2, -1, 1, 2, 3, 4]
    conditions = {
        "as is": lambda x: x,
        "pitch +-1..4 st": lambda x: pitch_shift(x, int(rng.choice(semitones)), sr),
        "tempo x0.85/x1.15": lambda x: time_stretch(x, float(rng.choice([0.85, 1.15])), sr),
    }
    n_clip = int(args.clip * sr)
    starts = [int(rng.integers(0, max(1, len(w) - n_clip))) for w in waves]
    settings = {
        "as is": (0,),
        f"keys -{args.transpositions}..+{args.transpositions}": key_shifts(args.transpositions),
    }
    print(f"\n{args.clip:g} s clips, min reduction | versions MAP | source top-1")
    print("--- | --- | ---")
    for cname, transform in conditions.items():
        clips = [transform(w[s : s + n_clip].numpy()) for w, s in zip(waves, starts, strict=False)]
        for sname, shifts in settings.items():
            aps, top1 = [], []
            for i, clip in enumerate(clips):
                d = query_distances(model, torch.from_numpy(clip), refs, shifts)
                others = np.arange(len(items)) != i
                relevant = cliques == cliques[i]
                if relevant[others].any():
                    aps.append(average_precision(d[others], relevant[others]))
                top1.append(bool(relevant[int(np.argmin(d))]))
            print(f"{cname}, query {sname} | {np.mean(aps):.3f} | {np.mean(top1):.3f}", flush=True)


if __name__ == "__main__":
    main()
