"""Chroma sequences: what alignment verification stores with each reference and reads from
each query.

Two 12-bin chromas are folded from the CQT the network sees (`refrain.model.qmax.fold_chroma`)
at `SEQUENCE_RATE` frames per second, each frame scaled to a maximum of 1 and quantised to one
byte per bin:

- the full chroma (every octave, magnitudes as they are, as Qmax's authors fold it), on which
  `refrain.model.align.locate` reads where a query matches;
- the upper chroma (`UPPER`: the octaves from C4 up, magnitudes to the power 1.5), on which
  verification scores the Qmax that re-ranks candidates. Versions that share a tune and
  change its harmony, bass and accompaniment keep the tune on top: leaving out the bass
  octaves and stressing the strongest partials lets the alignment follow the melody. On the
  validation works of both arrangement corpora it doubled Qmax's own MAP (mean of the track
  level and the 5-30 s clips: 0.228 -> 0.447 and 0.079 -> 0.163; model card).

A stored sequence is `HEADER` and then both, frame for frame: 48 bytes per second of audio,
2,880 per track-minute. A sequence stored by an older version is the full chroma alone
(no header: each of its frames holds a 255 or is silent, all zeros, and the header is
neither); `decode_upper` returns None for it and verification aligns it on the full
chroma. The query also gets a finer full chroma (`FINE_RATE`) from the same CQT, for the
tempo and offset refinement.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig
from .qmax import QmaxParams, fold_chroma

SEQUENCE_RATE = 2.0  # frames per second stored per reference (the Qmax baseline's rate)
FINE_RATE = 10.0  # frames per second of a query's fine sequence
BINS = 12
# verification's alignment: Qmax's settings on the upper chroma, the CQT bins from C4 (bin 36
# above C1) up with magnitudes to the power 1.5, chosen on validation works (model card)
UPPER = QmaxParams(lowest_bin=36, power=1.5)
HEADER = b"refrain-seq2"  # 12 bytes: starts a sequence holding both chromas


def sequence_bytes(frames: int) -> int:
    """The size of a stored sequence of `frames` frames."""
    return len(HEADER) + 2 * BINS * frames


def _quantised(chroma: np.ndarray) -> bytes:
    chroma = np.asarray(chroma, dtype=np.float32)
    if chroma.ndim != 2 or chroma.shape[1] != BINS:
        raise ValueError(f"expected chroma of shape (n, {BINS}), got {chroma.shape}")
    return np.round(np.clip(chroma, 0, 1) * 255).astype(np.uint8).tobytes()


def encode(chroma: np.ndarray, upper: np.ndarray | None = None) -> bytes:
    """(n, 12) full chroma in [0, 1], and the upper chroma of the same frames -> `HEADER` and
    2 * n * 12 bytes; without `upper`, the n * 12 bytes of the full chroma alone (an older
    version's format)."""
    full = _quantised(chroma)
    if upper is None:
        return full
    top = _quantised(upper)
    if len(top) != len(full):
        raise ValueError(
            f"expected both chromas of the same frames, got {len(full) // BINS} and "
            f"{len(top) // BINS}"
        )
    return HEADER + full + top


def _frames(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, BINS).astype(np.float32) / 255


def _parts(data: bytes) -> tuple[bytes, bytes | None]:
    if data[: len(HEADER)] == HEADER:
        body = data[len(HEADER) :]
        if len(body) % (2 * BINS):
            raise ValueError(
                f"a sequence of both chromas holds a multiple of {2 * BINS} bytes after its "
                f"header, got {len(body)}"
            )
        return body[: len(body) // 2], body[len(body) // 2 :]
    if len(data) % BINS:
        raise ValueError(f"a chroma sequence holds a multiple of {BINS} bytes, got {len(data)}")
    return data, None


def decode(data: bytes) -> np.ndarray:
    """`encode`'s bytes -> the (n, 12) float32 full chroma in [0, 1]."""
    return _frames(_parts(data)[0])


def decode_upper(data: bytes) -> np.ndarray | None:
    """`encode`'s bytes -> the (n, 12) float32 upper chroma, None in an older version's
    sequence (the full chroma alone)."""
    upper = _parts(data)[1]
    return None if upper is None else _frames(upper)


def decode_both(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """`encode`'s bytes -> (`decode`, `decode_upper`), read in one pass."""
    full, upper = _parts(data)
    return _frames(full), None if upper is None else _frames(upper)


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
        if len(x) <= self._cqt.half_width:  # reflection padding needs more than half a kernel
            x = x.repeat(self._cqt.half_width // len(x) + 1)
        return self._cqt(x.view(1, -1))[0].numpy()

    def sequences(
        self,
        wave: np.ndarray | torch.Tensor,
        rates: tuple[float, ...] = (SEQUENCE_RATE,),
        params: tuple[QmaxParams, ...] | None = None,
    ) -> list[np.ndarray]:
        """One CQT, folded at each of `rates` with the chroma settings of each of `params`
        (default: the full chroma at every rate): (n_r, 12) float32 each, n_r >= 2."""
        cqt = self.cqt(wave)
        out = []
        for rate, p in zip(rates, params or (QmaxParams(),) * len(rates), strict=True):
            chroma = fold_chroma(cqt, self._per_frame(rate), p.lowest_bin, p.power)
            out.append(chroma if len(chroma) >= 2 else np.repeat(chroma, 2, axis=0))
        return out

    def reference(self, wave: np.ndarray | torch.Tensor) -> bytes:
        """The stored sequence of a reference: both chromas at `SEQUENCE_RATE`, `encode`d."""
        full, upper = self.sequences(wave, (SEQUENCE_RATE,) * 2, (QmaxParams(), UPPER))
        return encode(full, upper)

    def query(self, wave: np.ndarray | torch.Tensor) -> QueryChroma:
        """A query's sequences: both chromas at `SEQUENCE_RATE`, quantised like a reference's
        so both sides align alike, and the full chroma at `FINE_RATE`."""
        full, upper, fine = self.sequences(
            wave, (SEQUENCE_RATE, SEQUENCE_RATE, FINE_RATE), (QmaxParams(), UPPER, QmaxParams())
        )
        coarse, top = decode_both(encode(full, upper))
        assert top is not None  # encoded with both
        return QueryChroma(coarse, fine, top)


class QueryChroma(NamedTuple):
    """A query's chroma sequences (`Chromagram.query`)."""

    chroma: np.ndarray  # (n, 12) full chroma at SEQUENCE_RATE
    fine: np.ndarray  # (n', 12) full chroma at FINE_RATE
    upper: np.ndarray  # (n, 12) upper chroma at SEQUENCE_RATE
