"""Training-free baselines: chroma 2D Fourier transform magnitude (2DFTM) segments, and chance.

Each 20 s segment becomes a chroma matrix (12 pitch classes x frames, folded from the
same CQT the network sees); the magnitude of its 2-D Fourier transform is invariant to
transposition (a circular shift of the pitch axis) and to time shifts. Segments are cut
like the network's, so the same reductions and evaluation protocol apply. It stands in
for an `Embedder` in `refrain.training.evaluate.evaluate`. `RandomScorer` ranks at random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from refrain.model.checkpoint import ModelIdentity
from refrain.model.config import ModelConfig
from refrain.model.embedder import AudioInput, load_waveform
from refrain.model.network import CLEWSNet
from refrain.model.qmax import PairCost
from refrain.model.shingle import ShingleCQT, cut_shingles

TIME_BINS = 40  # low temporal-modulation bins kept from the 2-D spectrum


class ChromaBaseline:
    """Chroma-2DFTM segment vectors with the `Embedder` interface used by evaluation."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        net = CLEWSNet(self.config)
        self._cqt = ShingleCQT(net.cqt[0], net.cqt[1])
        self.device = torch.device("cpu")
        self.zdim = 12 * TIME_BINS
        tag = hashlib.sha256(b"chroma-2dftm-v1").hexdigest()
        self.identity = ModelIdentity(
            tag, self.zdim, self.config.shingling.len, self.config.sample_rate
        )

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def waveform(self, audio: AudioInput) -> torch.Tensor:
        return load_waveform(audio, self.sample_rate)  # same decoding and checks as the network

    def vectors(self, cqt: torch.Tensor) -> np.ndarray:
        """Pooled CQT segments (S, bins, frames) -> 2DFTM vectors (S, 12 * TIME_BINS)."""
        s, bins, frames = cqt.shape
        octaves = bins // 12
        chroma = cqt[:, : octaves * 12].reshape(s, octaves, 12, frames).sum(1)
        chroma = torch.log1p(100 * chroma / chroma.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8))
        mag = torch.fft.rfft2(chroma).abs()[:, :, :TIME_BINS]
        mag[:, 0, 0] = 0  # drop the mean level
        v = mag.reshape(s, -1)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)
        return v.numpy().astype(np.float32)

    @torch.inference_mode()
    def embed(self, audio: AudioInput, hop: float = 5.0) -> np.ndarray:
        x = self.waveform(audio)
        sr = self.sample_rate
        length, step = int(sr * self.config.shingling.len), int(sr * hop)
        if self._cqt.supports(length, step, length):
            cqt = self._cqt(x, length, step)
        else:
            cqt = self._cqt.per_shingle(cut_shingles(x, length, step, length))
        return self.vectors(cqt)

    def embed_many(
        self, items: Iterable[AudioInput], hop: float = 5.0, batch_size: int = 32, **_: object
    ) -> list[np.ndarray]:
        return [self.embed(item, hop) for item in items]


class RandomScorer:
    """The floor every method must clear: a ranking drawn at random (`--baseline random`).

    A `PairwiseScorer` whose distances are uniform random numbers from `seed`, so that the
    evaluation's metrics on a manifest give what chance alone scores with its clique sizes."""

    name = "random"

    def __init__(self, seed: int = 0, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.device = torch.device("cpu")
        self.rng = np.random.default_rng(seed)
        tag = hashlib.sha256(f"random-v1-{seed}".encode()).hexdigest()
        self.identity = ModelIdentity(tag, 1, self.config.shingling.len, self.config.sample_rate)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def waveform(self, audio: AudioInput) -> torch.Tensor:
        return load_waveform(audio, self.sample_rate)

    def embed_many(
        self, items: Iterable[AudioInput], hop: float = 5.0, batch_size: int = 32, **_: object
    ) -> list[np.ndarray]:
        """One placeholder feature per decodable item (undecodable ones raise as the
        network's would)."""
        return [np.zeros((1, 1), np.float32) for _ in map(self.waveform, items)]

    def distances(
        self,
        queries: Sequence[Sequence[np.ndarray]],
        cands: Sequence[np.ndarray],
        progress: bool = False,
    ) -> tuple[list[np.ndarray], PairCost]:
        out = [self.rng.random((len(group), len(cands))) for group in queries]
        pairs = sum(d.size for d in out)
        return out, PairCost(self.name, pairs, 0.0, 0.0, 1)
