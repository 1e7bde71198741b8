"""Chroma sequences: what alignment verification stores with each reference and reads from
each query.

12-bin chroma folded from the CQT the network sees (`refrain.model.qmax.fold_chroma`), at
`SEQUENCE_RATE` frames per second, each frame scaled to a maximum of 1 and quantised to one
byte per bin: 24 bytes per second of audio, 1,440 per track-minute. The query also gets a
finer sequence (`align.FINE_RATE`) from the same CQT, for the tempo and offset refinement.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig
from .qmax import fold_chroma

SEQUENCE_RATE = 2.0  # frames per second stored per reference (the Qmax baseline's rate)
FINE_RATE = 10.0  # frames per second of a query's fine sequence
BINS = 12


def encode(chroma: np.ndarray) -> bytes:
    """(n, 12) chroma in [0, 1] -> n * 12 bytes."""
    chroma = np.asarray(chroma, dtype=np.float32)
    if chroma.ndim != 2 or chroma.shape[1] != BINS:
        raise ValueError(f"expected chroma of shape (n, {BINS}), got {chroma.shape}")
    return np.round(np.clip(chroma, 0, 1) * 255).astype(np.uint8).tobytes()


def decode(data: bytes) -> np.ndarray:
    """`encode`'s bytes -> (n, 12) float32 chroma in [0, 1]."""
    if len(data) % BINS:
        raise ValueError(f"a chroma sequence holds a multiple of {BINS} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, BINS).astype(np.float32) / 255


class Chromagram:
    """Waveform (mono, at the model's sample rate) -> chroma sequences, on the CPU."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        from .network import make_cqt
        from .shingle import CroppedCQT

        self.config = config or ModelConfig()
        self._cqt = CroppedCQT(make_cqt(self.config)[0])
        self._frames_per_s = 1.0 / self.config.cqt.hoplen

    def _per_frame(self, rate: float) -> int:
        return max(1, round(self._frames_per_s / rate))

    @torch.inference_mode()
    def cqt(self, wave: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
        if len(x) == 0:
            raise ValueError("no audio samples")
        if len(x) <= self._cqt.half:  # reflection padding needs more than half a kernel
            x = x.repeat(self._cqt.half // len(x) + 1)
        return self._cqt(x.view(1, -1))[0].numpy()

    def sequences(
        self, wave: np.ndarray | torch.Tensor, rates: tuple[float, ...] = (SEQUENCE_RATE,)
    ) -> list[np.ndarray]:
        """One CQT, folded at each of `rates`: (n_r, 12) float32 each, n_r >= 2."""
        cqt = self.cqt(wave)
        out = []
        for rate in rates:
            chroma = fold_chroma(cqt, self._per_frame(rate))
            out.append(chroma if len(chroma) >= 2 else np.repeat(chroma, 2, axis=0))
        return out

    def reference(self, wave: np.ndarray | torch.Tensor) -> bytes:
        """The stored sequence of a reference: `encode`d chroma at `SEQUENCE_RATE`."""
        return encode(self.sequences(wave)[0])

    def query(self, wave: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """A query's sequences: at `SEQUENCE_RATE`, quantised like a reference's so both
        sides align alike, and at `FINE_RATE`."""
        coarse, fine = self.sequences(wave, (SEQUENCE_RATE, FINE_RATE))
        return decode(encode(coarse)), fine
