"""Training losses over a batch of tracks x segments, all on segment distance reductions.

Every loss sees the same thing: a batch of B crops (several versions of each work),
each cut into S segments and embedded, z (B, S, D). Segment distances are nsqeuc; a
track pair's distance is the segment distance reduction `pos` for pairs of versions of
one work and `neg` for pairs of different works (only track-level labels are used).

- `clews`: alignment (mean positive distance) + uniformity over negatives,
  log(mean(exp(-gamma d)) + epsilon), in the numerically friendly log1p form.
- `triplet`: hardest positive and hardest negative per anchor, with a margin.
- `supcon`: supervised contrastive loss with similarity -gamma d.
- `align_uniform`: alignment + uniformity over all pairs without epsilon (the
  decoupled alignment-uniformity objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from refrain.model.reduce import nsqeuc, reduce

LOSSES = ("clews", "triplet", "supcon", "align_uniform")


@dataclass(frozen=True)
class LossConfig:
    name: str = "clews"  # one of LOSSES
    pos: str = "bpwr-5"  # reduction for positive pairs
    neg: str = "min"  # reduction for negative pairs
    gamma: float = 5.0  # temperature of the similarity kernel exp(-gamma d)
    epsilon: float = 1e-6  # CLEWS uniformity offset
    margin: float = 0.2  # triplet margin (in nsqeuc units)

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; expected one of {', '.join(LOSSES)}")


def _masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    return (x * keep).sum() / keep.sum().clamp(min=1)


def track_distances(z: Tensor, pos: str, neg: str) -> tuple[Tensor, Tensor]:
    """z (B, S, D) -> (B, B) track distances under the positive and negative reductions."""
    b, s, d = z.shape
    flat = z.reshape(b * s, d)
    dist = nsqeuc(flat, flat).reshape(b, s, b, s).permute(0, 2, 1, 3)  # (B, B, S, S)
    dpos = reduce(dist, pos)
    dneg = dpos if neg == pos else reduce(dist, neg)
    return dpos, dneg


def contrastive_loss(
    z: Tensor, labels: Tensor, track_ids: Tensor, config: LossConfig
) -> tuple[Tensor, dict[str, float]]:
    """The configured loss for embeddings z (B, S, D) of crops with work `labels` (B,)
    and track ids `track_ids` (B,) (two crops of one track are not a positive pair)."""
    dpos, dneg = track_distances(z, config.pos, config.neg)
    same_work = labels[:, None] == labels[None, :]
    same_track = track_ids[:, None] == track_ids[None, :]
    positive = (same_work & ~same_track).float()
    negative = (~same_work).float()
    g = config.gamma
    if config.name == "clews":
        align = _masked_mean(dpos, positive)
        b = 10.0  # exp(b - g d) keeps the mean away from underflow; log1p adds epsilon back
        beta = 1.0 / (config.epsilon * math.exp(b))
        uniform = torch.log1p(beta * _masked_mean(torch.exp(b - g * dneg), negative))
        loss = align + uniform
    elif config.name == "align_uniform":
        align = _masked_mean(dpos, positive)
        others = (~same_track).float()
        dall = torch.where(same_work, dpos, dneg)
        uniform = torch.log(_masked_mean(torch.exp(-g * dall), others).clamp(min=1e-30))
        loss = align + uniform
    elif config.name == "triplet":
        hardest_pos = torch.where(positive.bool(), dpos, torch.full_like(dpos, -math.inf)).amax(1)
        hardest_neg = torch.where(negative.bool(), dneg, torch.full_like(dneg, math.inf)).amin(1)
        valid = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
        per = torch.relu(hardest_pos - hardest_neg + config.margin)
        loss = per[valid].mean() if valid.any() else dpos.sum() * 0
        align, uniform = _masked_mean(dpos, positive), _masked_mean(dneg, negative)
    else:  # supcon
        logits = -g * torch.where(same_work, dpos, dneg)
        logits = logits.masked_fill(same_track, -math.inf)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        n_pos = positive.sum(1)
        per = -(torch.where(positive.bool(), log_prob, 0.0)).sum(1) / n_pos.clamp(min=1)
        loss = per[n_pos > 0].mean()
        align, uniform = _masked_mean(dpos, positive), _masked_mean(dneg, negative)
    stats = {
        "loss": float(loss.detach()),
        "align": float(align.detach()),
        "uniform": float(uniform.detach()),
        "d_pos": float(_masked_mean(dpos, positive).detach()),
        "d_neg": float(_masked_mean(dneg, negative).detach()),
    }
    return loss, stats
