"""Training a CLEWS network from weakly-labeled tracks (`refrain train CONFIG`).

Only track-level labels are used: a manifest lists `clique,path[,split]`, one row per
recording, where a clique is a work. Each step samples `works_per_batch` works x
`versions_per_work` recordings, takes a random crop of `crop_s` seconds of each (in the
CQT domain, from a cache computed once), cuts it into 20 s segments, embeds them and
applies the configured loss. Validation computes track-level MAP every epoch.
Checkpoints (`last/`, `best/` in Refrain's format, `train_state.pt`) allow resuming.
The data side (manifests, the CQT cache, batches) is `refrain.training.batches`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from refrain.model.checkpoint import save_refrain
from refrain.model.config import ModelConfig
from refrain.model.network import CLEWSNet
from refrain.training.augment import AugmentConfig
from refrain.training.batches import (
    BatchSampler,
    CQTCache,
    Track,
    cqt_frames,
    embed_cached,
    prefetched,
    read_tracks,
)
from refrain.training.losses import LossConfig, contrastive_loss

log = logging.getLogger("refrain.train")


@dataclass(frozen=True)
class DataConfig:
    manifest: str | list[str] = ""  # CSV(s) with clique,path[,split] (paths relative to each)
    cache: str = "cache/cqt"  # folder of cached CQTs (float16 .npy)
    crop_s: float = 60.0  # seconds per training crop (a multiple of the segment length)
    versions_per_work: int = 4  # recordings of each work per batch
    valid_fraction: float = 0.1  # used when the manifest has no split column
    # probability that a batch takes all its works from one manifest of the list (a work
    # belongs to the first manifest listing it): negatives of one style are the hard ones
    group_p: float = 0.0
    # probability that a batch is mined (`training/mining.py`): an anchor work and works drawn
    # from its `mine_pool` nearest by the current network, re-mined every `mine_every` epochs
    mine_p: float = 0.0
    mine_pool: int = 48
    mine_every: int = 1


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"  # checkpoints and logs
    works_per_batch: int = 16
    steps_per_epoch: int = 100
    epochs: int = 30
    lr: float = 1e-3
    min_lr: float = 1e-6
    plateau_patience: int = 3  # epochs without validation improvement before lr /= 5
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads; 0 = torch's default
    valid_hop_s: float = 10.0
    max_minutes: float = 0.0  # stop (after a checkpoint) past this wall time; 0 = no limit
    init: str = ""  # start from these weights (the same model, or one with fewer blocks a stage)
    # batches the sampler prepares ahead, in a background thread (0: none; unset: 2 on a GPU,
    # none on the CPU, where the thread would only compete with the step for the cores); the
    # batches are the same either way, only the wait for them goes (bench/train_speed.py)
    prefetch: int | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        def build(kind: type[Any], values: Mapping[str, Any]) -> Any:
            names = {f.name for f in fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            model=ModelConfig.from_dict(d.get("model", {})),
            data=build(DataConfig, d.get("data", {})),
            loss=build(LossConfig, d.get("loss", {})),
            augment=build(AugmentConfig, d.get("augment", {})),
            training=build(TrainConfig, d.get("training", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": asdict(self.data),
            "loss": asdict(self.loss),
            "augment": asdict(self.augment),
            "training": asdict(self.training),
        }


def validate(net: CLEWSNet, tracks: list[Track], config: RunConfig, device: torch.device) -> dict:
    from refrain.training.evaluate import Item, evaluate

    c = config.model
    seg_frames = cqt_frames(c, c.shingling.len)
    hop_frames = cqt_frames(c, config.training.valid_hop_s)
    zs = embed_cached(net, tracks, seg_frames, hop_frames, device)
    items = [Item(t.clique, t.path) for t in tracks]
    res = evaluate(None, items, embeddings=zs, query_seconds=(), reduction="bpwr-10")
    track = next(iter(res.values()))
    return {"MAP": track.map.mean, "MR1": track.mr1.mean, "NAR": track.nar.mean}


def init_weights(net: CLEWSNet, path: str | Path) -> None:
    """Copy the weights of checkpoint `path` (either format) into `net`.

    The model configurations must agree, except that `net` may have more residual blocks
    per backbone stage (a deeper network grown from a trained one). The source's blocks
    then fill the first places of each stage; the extra blocks keep their zero residual
    gain, which makes them identities, so the grown network computes exactly what the
    source did until training moves those gains.
    """
    from refrain.model.checkpoint import load_checkpoint

    source, _ = load_checkpoint(path)
    mine, theirs = net.config.to_dict(), source.config.to_dict()
    src_blocks = list(theirs["backbone"]["blocks"])
    dst_blocks = list(mine["backbone"]["blocks"])
    theirs["backbone"]["blocks"] = mine["backbone"]["blocks"]
    deeper = len(src_blocks) == len(dst_blocks) and all(
        d >= s for s, d in zip(src_blocks, dst_blocks, strict=True)
    )
    if mine != theirs or not deeper:
        raise ValueError(f"{path}: its model configuration differs from this run's")
    state = source.state_dict()
    if src_blocks != dst_blocks:
        state = _grown_backbone(state, src_blocks, dst_blocks, net.state_dict())
        log.info("backbone blocks %s grown to %s", src_blocks, dst_blocks)
    net.load_state_dict(state)
    log.info("initialised from %s", path)


def _grown_backbone(
    state: dict[str, torch.Tensor], src: list[int], dst: list[int], fresh: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` with backbone block i of stage j moved to its place in the deeper layout;
    the places left over take `fresh`'s (newly initialised, zero-gain) tensors."""
    moves: dict[int, int] = {}
    s0 = d0 = 0
    for ns, nd in zip(src, dst, strict=True):
        moves.update({s0 + i: d0 + i for i in range(ns)})
        s0, d0 = s0 + ns, d0 + nd
    out = {k: v for k, v in fresh.items() if k.startswith("backbone.")}
    for k, v in state.items():
        if k.startswith("backbone."):
            _, i, rest = k.split(".", 2)
            out[f"backbone.{moves[int(i)]}.{rest}"] = v
        else:
            out[k] = v
    return out


# -- the loop --------------------------------------------------------------------------------


def _ready(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch in page-locked memory when it goes to a GPU (the copy then overlaps work)."""
    if device.type != "cuda":
        return batch
    x, labels, ids = batch
    return x.pin_memory(), labels, ids


def train(config: RunConfig) -> Path:
    """Train (or resume) as configured; returns the folder of the best checkpoint."""
    tc = config.training
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    device = torch.device(tc.device)

    tracks = read_tracks(config.data.manifest, config.data.valid_fraction)
    cache = CQTCache(config.data.cache, config.model)
    train_tracks = cache.fill([t for t in tracks if t.split == "train"])
    valid_tracks = cache.fill([t for t in tracks if t.split == "valid"])
    log.info("%d train and %d valid tracks", len(train_tracks), len(valid_tracks))

    net = CLEWSNet(config.model).to(device)
    if tc.init:
        init_weights(net, tc.init)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=0.2, patience=tc.plateau_patience, min_lr=tc.min_lr
    )
    state_path = out / "train_state.pt"
    epoch, best, history = 0, -math.inf, []
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        epoch, best = state["epoch"], state["best"]
        history = json.loads(state["history"])
        log.info("resumed at epoch %d (best MAP %.4f)", epoch, best)
    sampler = BatchSampler(train_tracks, config, seed=tc.seed * 100_003 + epoch)

    depth = tc.prefetch if tc.prefetch is not None else (2 if device.type == "cuda" else 0)
    t_start = time.monotonic()
    while epoch < tc.epochs:
        mined: dict[str, float] = {}
        if config.data.mine_p > 0 and (
            sampler.neighbours is None or epoch % config.data.mine_every == 0
        ):
            mined = sampler.mine(net, device)
            log.info(
                "mined nearest works: %s", json.dumps({k: round(v, 4) for k, v in mined.items()})
            )
        net.train()
        stats_sum: dict[str, float] = {}
        seen, t0 = 0, time.monotonic()
        batches = prefetched(lambda: _ready(sampler.batch(), device), tc.steps_per_epoch, depth)
        bar = tqdm(
            batches, total=tc.steps_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step"
        )
        for x, labels, ids in bar:
            z = net(x.to(device, non_blocking=True)).reshape(len(labels), -1, config.model.zdim)
            loss, stats = contrastive_loss(z, labels.to(device), ids.to(device), config.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}",
                dpos=f"{stats['d_pos']:.3f}",
                dneg=f"{stats['d_neg']:.3f}",
            )
        train_s = time.monotonic() - t0
        metrics = validate(net, valid_tracks, config, device) if valid_tracks else {"MAP": 0.0}
        epoch += 1
        sched.step(metrics["MAP"])
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "segments_per_s": seen / train_s,
            "train_s": train_s,
            **{k: v / tc.steps_per_epoch for k, v in stats_sum.items()},
            **mined,
            **{f"valid_{k}": v for k, v in metrics.items()},
        }
        history.append(row)
        log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 4) for k, v in row.items()}))
        extra = {
            "trained": True,
            "epoch": epoch,
            "valid_map": metrics["MAP"],
            "loss": asdict(config.loss),
        }
        save_refrain(net.eval(), out / "last", extra=extra)
        if metrics["MAP"] > best:
            best = metrics["MAP"]
            save_refrain(net.eval(), out / "best", extra=extra)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": net.state_dict(),
                "optim": opt.state_dict(),
                "sched": sched.state_dict(),
                "epoch": epoch,
                "best": best,
                "history": json.dumps(history),
            },
            tmp,
        )
        tmp.replace(state_path)
        (out / "history.json").write_text(json.dumps(history, indent=1))
        if tc.max_minutes and (time.monotonic() - t_start) / 60 > tc.max_minutes:
            log.info("stopping after %.1f minutes (max_minutes)", tc.max_minutes)
            break
    return out / "best"
