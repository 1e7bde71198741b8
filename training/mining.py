"""Hard-negative mining for training: which works the current network confuses.

A batch of random works mostly holds negatives the network already tells apart: a reel and a
hymn differ in everything. The ones it learns from are works of one style whose tunes differ,
and which works those are changes as it learns. Every `mine_every` epochs the trainer embeds
one version of every training work (whole track, the validation hop) and keeps each work's
nearest works by segment distance (`min` over segment pairs, as the loss ranks negatives). A
mined batch (`data.mine_p`) then takes a random anchor work and fills the rest of the batch
with works drawn from the anchor's `mine_pool` nearest, so that most of its negatives are ones
the network currently places close to each other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch


def work_distances(
    segments: Sequence[np.ndarray], chunk: int = 2048, device: torch.device | None = None
) -> torch.Tensor:
    """Per work, (S_w, D) segment embeddings -> (W, W) min segment distance between works
    (the diagonal set to +inf)."""
    if len(segments) < 2:
        raise ValueError(f"mining needs at least 2 works, got {len(segments)}")
    z = torch.from_numpy(np.concatenate(segments).astype(np.float32))
    if device is not None:
        z = z.to(device)
    owner = torch.repeat_interleave(
        torch.arange(len(segments), device=z.device),
        torch.tensor([len(s) for s in segments], device=z.device),
    )
    n_works = len(segments)
    out = torch.full((n_works, n_works), torch.inf, device=z.device)
    cols = owner.expand(min(chunk, len(z)), -1)
    for start in range(0, len(z), chunk):
        d = torch.cdist(z[start : start + chunk], z)  # (c, N)
        per_work = torch.full((len(d), n_works), torch.inf, device=z.device)
        per_work.scatter_reduce_(1, cols[: len(d)], d, reduce="amin")  # (c, W)
        rows = owner[start : start + chunk, None].expand(-1, n_works)
        out.scatter_reduce_(0, rows, per_work, reduce="amin")
    out.fill_diagonal_(torch.inf)
    return out.cpu()


def nearest_works(distances: torch.Tensor, k: int) -> np.ndarray:
    """(W, W) distances -> (W, k) indices of each work's k nearest other works, nearest first."""
    k = min(k, len(distances) - 1)
    return torch.topk(distances, k, dim=1, largest=False).indices.numpy()


def mined_works(
    rng: random.Random, works: Sequence[str], neighbours: np.ndarray, n_works: int, pool: int
) -> list[str]:
    """A random anchor and n_works - 1 distinct works drawn from its `pool` nearest (topped up
    at random when the pool is smaller than the batch)."""
    anchor = rng.randrange(len(works))
    near = [int(i) for i in neighbours[anchor, :pool]]
    chosen = rng.sample(near, min(n_works - 1, len(near)))
    taken = {anchor, *chosen}
    while len(taken) < min(n_works, len(works)):
        i = rng.randrange(len(works))
        if i not in taken:
            taken.add(i)
            chosen.append(i)
    return [works[anchor]] + [works[i] for i in chosen]
