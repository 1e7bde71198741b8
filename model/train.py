"""Training a CLEWS network from weakly-labeled tracks (`refrain train CONFIG`).

Only track-level labels are used: a manifest lists `clique,path[,split]`, one row per
recording, where a clique is a work. Each step samples `works_per_batch` works x
`versions_per_work` recordings, takes a random crop of `crop_s` seconds of each (in the
CQT domain, from a cache computed once), cuts it into 20 s segments, embeds them and
applies the configured loss. Validation computes track-level MAP every epoch.
Checkpoints (`last/`, `best/` in Refrain's format, `train_state.pt`) allow resuming.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from refrain.model.audio import AudioDecodeError, load_audio
from refrain.model.augment import AugmentConfig, augment, stretch_rate, time_stretch
from refrain.model.checkpoint import save_refrain
from refrain.model.config import ModelConfig
from refrain.model.losses import LossConfig, contrastive_loss
from refrain.model.network import CLEWSNet
from refrain.model.shingle import CroppedCQT, repeat_pad

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


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        def build(kind, values):
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


# -- data ------------------------------------------------------------------------------------


@dataclass
class Track:
    clique: str
    path: Path
    split: str
    cqt: np.ndarray | None = None  # (bins, frames) float16, pooled
    group: int = 0  # position of its manifest in the configured list


def read_tracks(
    manifest: str | Path | list[str | Path], valid_fraction: float = 0.1
) -> list[Track]:
    """Rows of a `clique,path[,split]` manifest (or of several, in turn: the same clique in
    two manifests is one work); without a split column, works are split by a hash of the
    clique (never versions of one work across splits)."""
    if isinstance(manifest, list | tuple):
        tracks = []
        for g, m in enumerate(manifest):
            tracks += [replace(t, group=g) for t in read_tracks(m, valid_fraction)]
        return tracks
    manifest = Path(manifest)
    tracks = []
    with open(manifest, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            if not row.get("clique") or not row.get("path"):
                raise ValueError(f"{manifest}:{n}: expected clique and path, got {row}")
            split = (row.get("split") or "").strip()
            if not split:
                h = int(hashlib.sha1(row["clique"].encode()).hexdigest()[:8], 16) / 2**32
                split = "valid" if h < valid_fraction else "train"
            tracks.append(Track(row["clique"], manifest.parent / row["path"], split))
    return tracks


class CQTCache:
    """Pooled whole-track CQTs, computed once per file and kept as float16 .npy files."""

    def __init__(self, folder: str | Path, config: ModelConfig) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = config
        net_cqt = CLEWSNet(config).cqt
        self.transform = CroppedCQT(net_cqt[0])
        self.pool = net_cqt[1]
        self.tag = hashlib.sha1(json.dumps(asdict(config.cqt)).encode()).hexdigest()[:10]

    def _key(self, path: Path) -> Path:
        st = path.stat()
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.tag}"
        return self.folder / (hashlib.sha1(raw.encode()).hexdigest() + ".npy")

    @torch.inference_mode()
    def compute(self, path: Path) -> np.ndarray:
        x = torch.from_numpy(load_audio(path, sample_rate=self.config.sample_rate))
        x = repeat_pad(x, int(self.config.shingling.len * self.config.sample_rate))
        return self.pool(self.transform(x[None]))[0].numpy().astype(np.float16)

    def get(self, path: Path) -> np.ndarray:
        key = self._key(path)
        if key.exists():
            return np.load(key)
        cqt = self.compute(path)
        tmp = key.with_suffix(".tmp.npy")
        np.save(tmp, cqt)
        tmp.replace(key)
        return cqt

    def fill(self, tracks: list[Track]) -> list[Track]:
        """Load or compute every track's CQT; tracks that fail to decode are dropped."""
        ok = []
        for t in tqdm(tracks, desc="CQT cache", unit="file"):
            try:
                t.cqt = self.get(t.path)
                ok.append(t)
            except (AudioDecodeError, OSError) as e:
                log.warning("skipping %s: %s", t.path, e)
        return ok


class BatchSampler:
    """Works x versions x random crops, in the CQT domain, with augmentations."""

    def __init__(self, tracks: list[Track], config: RunConfig, seed: int) -> None:
        self.config = config
        self.by_work: dict[str, list[int]] = {}
        for i, t in enumerate(tracks):
            self.by_work.setdefault(t.clique, []).append(i)
        self.works = sorted(w for w, idx in self.by_work.items() if len(idx) >= 2)
        if len(self.works) < 2:
            raise ValueError(
                f"training needs at least 2 works with 2+ versions, got {len(self.works)}"
            )
        groups: dict[int, list[str]] = {}
        for w in self.works:
            groups.setdefault(min(tracks[i].group for i in self.by_work[w]), []).append(w)
        # only groups that can fill a batch on their own; drawn in proportion to their size
        n = config.training.works_per_batch
        self.groups = [ws for _, ws in sorted(groups.items()) if len(ws) >= n]
        self.tracks = tracks
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        c = config.model
        self.seg_frames = round(c.shingling.len / (c.cqt.hoplen * c.cqt.pool))
        self.n_segments = max(1, round(config.data.crop_s / c.shingling.len))

    def crop(self, cqt: np.ndarray) -> torch.Tensor:
        frames = self.seg_frames * self.n_segments
        rate = stretch_rate(self.config.augment, self.gen)
        src = max(2, round(frames / rate))
        x = torch.from_numpy(cqt.astype(np.float32))
        if x.shape[1] < src:
            x = x.repeat(1, -(-src // x.shape[1]))
        start = self.rng.randrange(0, x.shape[1] - src + 1)
        x = x[:, start : start + src]
        if src != frames:
            x = time_stretch(x, frames / src, frames)
        return augment(x, self.config.augment, self.gen)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> CQT segments (B*S, bins, frames), work labels (B,), track ids (B,)."""
        n_works = min(self.config.training.works_per_batch, len(self.works))
        pool = self.works
        if (
            self.groups
            and self.config.data.group_p > 0
            and self.rng.random() < self.config.data.group_p
        ):
            pool = self.rng.choices(self.groups, weights=[len(g) for g in self.groups])[0]
        works = self.rng.sample(pool, n_works)
        crops, labels, ids = [], [], []
        for w, work in enumerate(works):
            idx = self.by_work[work]
            n = self.config.data.versions_per_work
            chosen = (
                self.rng.sample(idx, n)
                if len(idx) >= n
                else [self.rng.choice(idx) for _ in range(n)]
            )
            for i in chosen:
                crops.append(self.crop(self.tracks[i].cqt))
                labels.append(w)
                ids.append(i)
        x = torch.stack(crops)  # (B, bins, S * seg_frames)
        b, bins, _ = x.shape
        x = x.reshape(b, bins, self.n_segments, self.seg_frames).permute(0, 2, 1, 3)
        return (
            x.reshape(b * self.n_segments, bins, self.seg_frames),
            torch.tensor(labels),
            torch.tensor(ids),
        )


def track_segments(cqt: np.ndarray, seg_frames: int, hop_frames: int) -> torch.Tensor:
    """Whole-track CQT -> overlapping segments (S, bins, seg_frames), repeat-padded."""
    x = torch.from_numpy(cqt.astype(np.float32))
    total = max(seg_frames, x.shape[1])
    n = max(0, math.ceil((total - seg_frames) / hop_frames)) + 1
    x = repeat_pad(x, (n - 1) * hop_frames + seg_frames)
    return x.unfold(1, seg_frames, hop_frames).permute(1, 0, 2).contiguous()


@torch.inference_mode()
def embed_cached(
    net: CLEWSNet,
    tracks: list[Track],
    seg_frames: int,
    hop_frames: int,
    device: torch.device,
    batch: int = 64,
) -> list[np.ndarray]:
    net.eval()
    out = []
    for t in tracks:
        segs = track_segments(t.cqt, seg_frames, hop_frames)
        z = torch.cat([net(segs[i : i + batch].to(device)) for i in range(0, len(segs), batch)])
        out.append(z.cpu().numpy())
    return out


def validate(net: CLEWSNet, tracks: list[Track], config: RunConfig, device: torch.device) -> dict:
    from refrain.model.evaluate import Item, evaluate

    c = config.model
    seg_frames = round(c.shingling.len / (c.cqt.hoplen * c.cqt.pool))
    hop_frames = max(1, round(config.training.valid_hop_s / (c.cqt.hoplen * c.cqt.pool)))
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

    t_start = time.monotonic()
    while epoch < tc.epochs:
        net.train()
        stats_sum: dict[str, float] = {}
        seen, t0 = 0, time.monotonic()
        bar = tqdm(range(tc.steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step")
        for _ in bar:
            x, labels, ids = sampler.batch()
            z = net(x.to(device)).reshape(len(labels), -1, config.model.zdim)
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
