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

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.search import key_shifts  # noqa: E402
from model import load_model  # noqa: E402
from model.embedder import transposed  # noqa: E402
from model.evaluate import read_manifest  # noqa: E402
from model.metrics import average_precision  # noqa: E402
from model.reduce import nsqeuc  # noqa: E402


def ffmpeg_filter(x: np.ndarray, graph_text: str, sr: int) -> np.ndarray:
    """Run mono float audio through an ffmpeg audio filter chain; returns mono float32."""
    graph = av.filter.Graph()
    src = graph.add_abuffer(format="flt", sample_rate=sr, layout="mono")
    chain = [src]
    for spec in graph_text.split(","):
        name, _, args = spec.partition("=")
        chain.append(graph.add(name, args or None))
    sink = graph.add("abuffersink")
    chain.append(sink)
    for a, b in zip(chain, chain[1:]):
        a.link_to(b)
    graph.configure()
    out = []
    block = 4096
    for i in range(0, len(x), block):
        frame = av.AudioFrame.from_ndarray(x[None, i : i + block].astype(np.float32), format="flt",
                                           layout="mono")
        frame.sample_rate = sr
        frame.pts = i
        graph.push(frame)
        out.extend(_drain(graph))
    graph.push(None)
    out.extend(_drain(graph))
    return np.concatenate(out).astype(np.float32)


def _drain(graph) -> list[np.ndarray]:
    frames = []
    while True:
        try:
            frames.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.BlockingIOError, av.error.EOFError):
            return frames


def pitch_shift(x: np.ndarray, semitones: int, sr: int) -> np.ndarray:
    r = 2 ** (semitones / 12)
    return ffmpeg_filter(x, f"asetrate={int(sr * r)},aresample={sr},atempo={1 / r:.6f}", sr)


def time_stretch(x: np.ndarray, rate: float, sr: int) -> np.ndarray:
    return ffmpeg_filter(x, f"atempo={rate:.6f}", sr)


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
    refs = [torch.from_numpy(z) for z in model.embed_many([w for w in waves], hop=5.0)]
    print(f"{len(items)} tracks of {len(set(cliques))} works embedded in "
          f"{time.monotonic() - t0:.0f} s", flush=True)

    conditions = {"as is": lambda x: x,
                  "pitch +-1..4 st": lambda x: pitch_shift(x, int(rng.choice([-4, -3, -2, -1, 1, 2, 3, 4])), sr),
                  "tempo x0.85/x1.15": lambda x: time_stretch(x, float(rng.choice([0.85, 1.15])), sr)}
    n_clip = int(args.clip * sr)
    starts = [int(rng.integers(0, max(1, len(w) - n_clip))) for w in waves]
    settings = {"as is": (0,), f"keys -{args.transpositions}..+{args.transpositions}":
                key_shifts(args.transpositions)}
    print(f"\n{args.clip:g} s clips, min reduction | versions MAP | source top-1")
    print("--- | --- | ---")
    for cname, transform in conditions.items():
        clips = [transform(w[s : s + n_clip].numpy()) for w, s in zip(waves, starts)]
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
