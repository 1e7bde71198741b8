"""Training data: the tracks of version manifests, their cached CQTs, and batches of works
x versions x random crops (with augmentations), random, of one manifest or mined.

`refrain.training.train` runs the loop over these; a batch is what the contrastive loss of
`refrain.training.losses` sees: `works_per_batch` works x `versions_per_work` recordings, each
a random `crop_s` crop cut into 20 s segments.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from refrain.model.audio import AudioDecodeError, load_audio
from refrain.model.config import ModelConfig
from refrain.model.network import CLEWSNet
from refrain.model.shingle import CroppedCQT, repeat_pad
from refrain.training.augment import augment, stretch_rate, time_stretch
from refrain.training.mining import mined_works, nearest_works, work_distances

if TYPE_CHECKING:
    from refrain.training.train import RunConfig

log = logging.getLogger("refrain.train")


@dataclass
class Track:
    clique: str
    path: Path
    split: str
    cqt: np.ndarray | None = None  # (bins, frames) float16, pooled
    group: int = 0  # position of its manifest in the configured list


def read_tracks(
    manifest: str | Path | list[str] | list[str | Path], valid_fraction: float = 0.1
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
        self.neighbours: np.ndarray | None = None  # (len(works), pool), set by mine()
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        c = config.model
        self.seg_frames = cqt_frames(c, c.shingling.len)
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
        data = self.config.data
        if self.neighbours is not None and data.mine_p > 0 and self.rng.random() < data.mine_p:
            works = mined_works(self.rng, self.works, self.neighbours, n_works, data.mine_pool)
        else:
            pool = self.works
            if self.groups and data.group_p > 0 and self.rng.random() < data.group_p:
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
                cqt = self.tracks[i].cqt
                assert cqt is not None, "the sampler's tracks have their CQT loaded"
                crops.append(self.crop(cqt))
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

    def mine(self, net: CLEWSNet, device: torch.device) -> dict[str, float]:
        """Embed one random version of every work (the validation hop) and keep each work's
        nearest works."""
        t0 = time.monotonic()
        chosen = [self.tracks[self.rng.choice(self.by_work[w])] for w in self.works]
        hop_frames = cqt_frames(self.config.model, self.config.training.valid_hop_s)
        zs = embed_cached(net, chosen, self.seg_frames, hop_frames, device)
        d = work_distances(zs, device=device)
        self.neighbours = nearest_works(d, self.config.data.mine_pool)
        near = d.gather(1, torch.from_numpy(self.neighbours[:, :1]))
        return {"mine_s": time.monotonic() - t0, "mine_d_nearest": float(near.mean())}


T = TypeVar("T")
# what a background call of `make` gave: (True, its result) or (False, the exception it raised)
_Made = tuple[Literal[True], T] | tuple[Literal[False], BaseException]


def prefetched(make: Callable[[], T], n: int, depth: int) -> Iterator[T]:
    """The results of calling `make` `n` times, in order; with `depth` > 0 the calls run in a
    background thread, at most `depth` results ahead of the consumer, so that preparing the
    next batch (CPU) overlaps the current step (the accelerator). The same calls in the same
    order as without it: a seeded sampler yields the same batches. An exception in `make`
    is raised in the consumer; a consumer that stops early stops the thread."""
    if depth <= 0:
        for _ in range(n):
            yield make()
        return
    results: queue.Queue[_Made[T]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: _Made[T]) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for _ in range(n):
                if not put((True, make())):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=work, name="refrain-batches", daemon=True)
    thread.start()
    try:
        for _ in range(n):
            result = results.get()
            if result[0] is False:
                raise result[1]
            yield result[1]
    finally:
        stop.set()
        thread.join()


def cqt_frames(config: ModelConfig, seconds: float) -> int:
    """Pooled CQT frames in `seconds` (at least one)."""
    return max(1, round(seconds / (config.cqt.hoplen * config.cqt.pool)))


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
        assert t.cqt is not None, "tracks are embedded once their CQT is loaded"
        segs = track_segments(t.cqt, seg_frames, hop_frames)
        z = torch.cat([net(segs[i : i + batch].to(device)) for i in range(0, len(segs), batch)])
        out.append(z.cpu().numpy())
    return out
