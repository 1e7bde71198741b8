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

- the tune chroma (`TUNE`): the pitch probabilities of the tune-salience network
  (`refrain.model.salience`) folded to pitch classes, the tune alone without the harmony and
  accompaniment around it; verification aligns on it where both sides have it.

A stored sequence is `HEADER_TUNE`, the frame count, the three chromas frame for frame and
then the tune's contour (`CONTOUR_RATE` MIDI pitches a second, which the console draws):
77 bytes per second of audio, 4,620 per track-minute. Older versions stored `HEADER` and
the first two, or the full chroma alone (no header: each of its frames holds a 255 or is
silent, all zeros, and no header is either); `decode_upper` returns None for the latter,
`decode_tune` and `decode_contour` for both, and verification aligns those on what they
hold. The query also gets a finer full chroma (`FINE_RATE`) from the same CQT, for the tempo
and offset refinement.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig
from .qmax import QmaxParams, chroma_of

SEQUENCE_RATE = 2.0  # frames per second stored per reference (the Qmax baseline's rate)
FINE_RATE = 10.0  # frames per second of a query's fine sequence
BINS = 12
CONTOUR_RATE = 5.0  # frames per second of the tune's stored contour (for display)
# verification's alignment: Qmax's settings on the upper chroma, the CQT bins from C4 (bin 36
# above C1) up with magnitudes to the power 1.5, chosen on validation works (model card)
UPPER = QmaxParams(lowest_bin=36, power=1.5)
TUNE = QmaxParams(tune=True)  # the tune chroma (`refrain.model.salience`)
HEADER = b"refrain-seq2"  # 12 bytes: starts a sequence holding the full and upper chromas
HEADER_TUNE = b"refrain-seq3"  # ... the full, upper and tune chromas


def sequence_bytes(frames: int, seconds: float | None = None) -> int:
    """The size of a stored sequence of `frames` frames (with its contour of `seconds`,
    `frames / SEQUENCE_RATE` when None)."""
    seconds = frames / SEQUENCE_RATE if seconds is None else seconds
    contour = int(seconds * CONTOUR_RATE) + 1
    return len(HEADER_TUNE) + 4 + 3 * BINS * frames + contour


def _quantised(chroma: np.ndarray) -> bytes:
    chroma = np.asarray(chroma, dtype=np.float32)
    if chroma.ndim != 2 or chroma.shape[1] != BINS:
        raise ValueError(f"expected chroma of shape (n, {BINS}), got {chroma.shape}")
    return np.round(np.clip(chroma, 0, 1) * 255).astype(np.uint8).tobytes()


def encode(
    chroma: np.ndarray,
    upper: np.ndarray | None = None,
    tune: np.ndarray | None = None,
    contour: np.ndarray | None = None,
) -> bytes:
    """(n, 12) full chroma in [0, 1], the upper and tune chromas of the same frames and the
    tune's contour (MIDI pitch per frame at `CONTOUR_RATE`, 0 for rests) -> `HEADER_TUNE`, n
    (4 bytes), 3 * n * 12 bytes and a byte per contour frame; without `tune` and `contour`,
    `HEADER` and 2 * n * 12 bytes; without any, the n * 12 bytes of the full chroma alone
    (older versions' formats)."""
    full = _quantised(chroma)
    if (tune is None) != (contour is None):
        raise ValueError("a sequence holds both the tune chroma and the tune's contour, or neither")
    if upper is None:
        if tune is not None:
            raise ValueError("a sequence with the tune chroma holds the upper chroma too")
        return full
    rest = [_quantised(upper)] + ([] if tune is None else [_quantised(tune)])
    if any(len(r) != len(full) for r in rest):
        raise ValueError(
            "expected every chroma of the same frames, got "
            + " and ".join(str(len(r) // BINS) for r in (full, *rest))
        )
    if contour is None:
        return HEADER + full + rest[0]
    pitches = np.clip(np.round(np.asarray(contour, dtype=np.float32)), 0, 127).astype(np.uint8)
    n = struct.pack("<I", len(full) // BINS)
    return HEADER_TUNE + n + full + b"".join(rest) + pitches.tobytes()


def _frames(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, BINS).astype(np.float32) / 255


class _Parts(NamedTuple):
    full: bytes
    upper: bytes | None
    tune: bytes | None
    contour: bytes | None


def _parts(data: bytes) -> _Parts:
    if data[: len(HEADER_TUNE)] == HEADER_TUNE:
        head = len(HEADER_TUNE) + 4
        if len(data) < head:
            raise ValueError("a sequence with the tune holds its frame count after its header")
        (n,) = struct.unpack("<I", data[len(HEADER_TUNE) : head])
        size = n * BINS
        if len(data) < head + 3 * size:
            raise ValueError(
                f"a sequence of {n} frames holds {3 * size} bytes of chroma after its header, "
                f"got {len(data) - head}"
            )
        body = data[head:]
        return _Parts(
            body[:size], body[size : 2 * size], body[2 * size : 3 * size], body[3 * size :]
        )
    if data[: len(HEADER)] == HEADER:
        body = data[len(HEADER) :]
        if len(body) % (2 * BINS):
            raise ValueError(
                f"a sequence of both chromas holds a multiple of {2 * BINS} bytes after its "
                f"header, got {len(body)}"
            )
        n = len(body) // 2
        return _Parts(body[:n], body[n:], None, None)
    if len(data) % BINS:
        raise ValueError(f"a chroma sequence holds a multiple of {BINS} bytes, got {len(data)}")
    return _Parts(data, None, None, None)


def decode(data: bytes) -> np.ndarray:
    """`encode`'s bytes -> the (n, 12) float32 full chroma in [0, 1]."""
    return _frames(_parts(data).full)


def decode_upper(data: bytes) -> np.ndarray | None:
    """`encode`'s bytes -> the (n, 12) float32 upper chroma, None in an older version's
    sequence (the full chroma alone)."""
    upper = _parts(data).upper
    return None if upper is None else _frames(upper)


def decode_tune(data: bytes) -> np.ndarray | None:
    """`encode`'s bytes -> the (n, 12) float32 tune chroma, None in an older version's."""
    tune = _parts(data).tune
    return None if tune is None else _frames(tune)


def decode_contour(data: bytes) -> np.ndarray | None:
    """`encode`'s bytes -> the tune's MIDI pitch per frame at `CONTOUR_RATE` (float32, 0 for
    rests), None in an older version's sequence."""
    contour = _parts(data).contour
    return None if contour is None else np.frombuffer(contour, np.uint8).astype(np.float32)


def decode_both(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """`encode`'s bytes -> (`decode`, `decode_upper`), read in one pass."""
    parts = _parts(data)
    return _frames(parts.full), None if parts.upper is None else _frames(parts.upper)


def decode_all(data: bytes) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`encode`'s bytes -> (`decode`, `decode_upper`, `decode_tune`), read in one pass."""
    parts = _parts(data)
    return (
        _frames(parts.full),
        None if parts.upper is None else _frames(parts.upper),
        None if parts.tune is None else _frames(parts.tune),
    )


class Chromagram:
    """Waveform (mono, at the model's sample rate) -> chroma sequences, on the CPU."""

    def __init__(self, config: ModelConfig | None = None, tune: bool = True) -> None:
        from .network import make_cqt
        from .shingle import CroppedCQT

        self.config = config or ModelConfig()
        self._cqt = CroppedCQT(make_cqt(self.config)[0])
        self._frames_per_s = 1.0 / self.config.cqt.hoplen
        self.tune = tune  # whether sequences hold the tune chroma

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
        return self._sequences(self.cqt(wave), rates, params)[0]

    def _sequences(
        self,
        cqt: np.ndarray,
        rates: tuple[float, ...],
        params: tuple[QmaxParams, ...] | None,
        contour: bool = False,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """`sequences` of a CQT, and the tune's contour at `CONTOUR_RATE` when asked; the
        salience network runs once, when a chroma or the contour needs it."""
        from .salience import contour_of, frame_probabilities

        params = params or (QmaxParams(),) * len(rates)
        probs = frame_probabilities(cqt) if contour or any(p.tune for p in params) else None
        out = []
        for rate, p in zip(rates, params, strict=True):
            chroma = chroma_of(cqt, self._per_frame(rate), p, probs)
            out.append(chroma if len(chroma) >= 2 else np.repeat(chroma, 2, axis=0))
        if probs is None or not contour:
            return out, None
        return out, contour_of(probs, self._per_frame(CONTOUR_RATE))

    def reference(self, wave: np.ndarray | torch.Tensor) -> bytes:
        """The stored sequence of a reference: the full, upper and (with `tune`) tune chromas
        at `SEQUENCE_RATE`, `encode`d."""
        params = (QmaxParams(), UPPER, TUNE) if self.tune else (QmaxParams(), UPPER)
        rates = (SEQUENCE_RATE,) * len(params)
        chromas, contour = self._sequences(self.cqt(wave), rates, params, self.tune)
        tune = chromas[2] if self.tune else None
        return encode(chromas[0], chromas[1], tune, contour)

    def query(self, wave: np.ndarray | torch.Tensor) -> QueryChroma:
        """A query's sequences: the full, upper and (with `tune`) tune chromas at
        `SEQUENCE_RATE`, quantised like a reference's so both sides align alike, and the full
        chroma at `FINE_RATE`."""
        params = (QmaxParams(), QmaxParams(), UPPER) + ((TUNE,) if self.tune else ())
        rates = (FINE_RATE,) + (SEQUENCE_RATE,) * (len(params) - 1)
        chromas, contour = self._sequences(self.cqt(wave), rates, params, self.tune)
        fine, coarse = chromas[0], chromas[1:]
        tune = coarse[2] if self.tune else None
        full, upper, tune = decode_all(encode(coarse[0], coarse[1], tune, contour))
        assert upper is not None  # encoded with it
        return QueryChroma(full, fine, upper, tune, contour)


class QueryChroma(NamedTuple):
    """A query's chroma sequences (`Chromagram.query`)."""

    chroma: np.ndarray  # (n, 12) full chroma at SEQUENCE_RATE
    fine: np.ndarray  # (n', 12) full chroma at FINE_RATE
    upper: np.ndarray  # (n, 12) upper chroma at SEQUENCE_RATE
    tune: np.ndarray | None = None  # (n, 12) tune chroma at SEQUENCE_RATE
    contour: np.ndarray | None = None  # the tune's MIDI pitch at CONTOUR_RATE, 0 for rests
