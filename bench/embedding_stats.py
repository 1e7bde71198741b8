"""The shape of a model's embedding space, for `bench/search.py --data model`.

    python bench/embedding_stats.py --manifest corpus/manifest.csv \
        --out bench/data/embedding-stats.npz

Every track of the manifest is embedded at the reference hop (5 s) and each segment vector
is split into three parts: its work's mean, its track's offset from that (the version), and
its own offset from its track's mean (where in the track it is). The covariance of each part
is written as a square-root factor (float16), with the mean vector and the eigenvalue spectra,
so that synthetic catalogs of any size can be drawn with the model's geometry: a real
embedding space is far from isotropic (the shipped model's participation ratio is about 20
of 256 dimensions), and how well an ANN index works depends on it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from refrain.model import load_model
from refrain.training.evaluate import read_manifest

HOP_S = 5.0


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """(sum l)^2 / sum l^2: the number of dimensions the variance effectively spreads over."""
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


def sqrt_factor(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, eigenvalues) with L @ L.T == cov for a symmetric positive semi-definite cov."""
    w, v = np.linalg.eigh(cov)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)).astype(np.float32), w[::-1]


def decompose(tracks: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Work / version / segment parts of the segment vectors of {work: [(n, zdim) per track]}."""
    every = np.concatenate([z for zs in tracks.values() for z in zs])
    mean = every.mean(axis=0)
    work, version, segment = [], [], []
    for zs in tracks.values():
        centre = np.concatenate(zs).mean(axis=0)
        work.append(centre - mean)
        for z in zs:
            own = z.mean(axis=0)
            version.append(own - centre)
            segment.append(z - own)
    out = {"mean": mean.astype(np.float32)}
    for name, parts in (
        ("work", np.array(work)),
        ("version", np.array(version)),
        ("segment", np.concatenate(segment)),
    ):
        factor, spectrum = sqrt_factor(parts.T @ parts / max(len(parts) - 1, 1))
        out[f"{name}_factor"] = factor.astype(np.float16)
        out[f"{name}_spectrum"] = spectrum.astype(np.float32)
    out["total_spectrum"] = np.linalg.eigvalsh(np.cov(every.T))[::-1].astype(np.float32)
    out["counts"] = np.array([len(tracks), sum(map(len, tracks.values())), len(every)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, default=Path("corpus/manifest.csv"))
    ap.add_argument("--out", type=Path, default=Path("bench/data/embedding-stats.npz"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    model = load_model()
    items = read_manifest(args.manifest)
    tracks: dict[str, list[np.ndarray]] = defaultdict(list)
    for item in tqdm(items, desc="embed", unit="track"):
        z = model.embed(str(item.path), hop=HOP_S)
        if len(z):
            tracks[item.clique].append(z)
    stats = decompose(tracks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **stats)
    works, n_tracks, segments = stats["counts"]
    print(f"{works} works, {n_tracks} tracks, {segments} segments -> {args.out}")
    print(
        f"participation ratio: all {participation_ratio(stats['total_spectrum']):.1f}, "
        + ", ".join(
            f"{p} {participation_ratio(stats[p + '_spectrum']):.1f}"
            for p in ("work", "version", "segment")
        )
        + f" (of {len(stats['mean'])})"
    )
    print(
        "variance: "
        + ", ".join(
            f"{p} {stats[p + '_spectrum'].sum():.1f}" for p in ("work", "version", "segment")
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
