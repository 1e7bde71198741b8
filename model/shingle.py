"""Cutting audio into shingles and computing their CQTs, exactly as the reference does.

The reference repeat-pads a track so that the last shingle is full, cuts overlapping
shingles, and computes one CQT per shingle. At a 5 s hop every sample is transformed
four times. `ShingleCQT` computes one CQT over the whole padded track instead and
recomputes only the frames near each shingle's edges, whose kernels see the
shingle's reflection padding rather than the neighbouring audio; every frame is then
what the per-shingle CQT gives, up to float summation order.
"""

from __future__ import annotations

import math

import torch
from nnAudio.features import CQT1992v2
from torch import nn


def padded_length(n: int, length: int, hop: int) -> int:
    """Length the reference pads a signal of `n` samples to before cutting shingles."""
    return max(math.ceil((n - length) / hop), 0) * hop + length


def repeat_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat `x` (..., T) end to end and cut to `length` samples (no-op if long enough)."""
    if x.size(-1) >= length:
        return x[..., :length] if x.size(-1) > length else x
    reps = -(-length // x.size(-1))
    return x.repeat(*([1] * (x.ndim - 1)), reps)[..., :length]


def num_shingles(n: int, length: int, hop: int) -> int:
    return (padded_length(n, length, hop) - length) // hop + 1


def cut_shingles(x: torch.Tensor, length: int, hop: int, min_length: int) -> torch.Tensor:
    """1-D signal -> (S, max(length, min_length)) shingles, the reference's framing."""
    x = repeat_pad(x, padded_length(x.size(-1), length, hop))
    frames = x.unfold(-1, length, hop)
    if length < min_length:
        frames = repeat_pad(frames, min_length)
    return frames


class CroppedCQT(nn.Module):
    """nnAudio's CQT1992v2 (magnitude, librosa normalisation) with zero kernel taps skipped.

    nnAudio pads every kernel to the longest one's width; the bins of each octave are
    nonzero over a span that halves from octave to octave, so convolving each octave
    with its own span does about a seventh of the work. Same sums, other order.
    """

    scale: torch.Tensor

    def __init__(self, cqt: CQT1992v2, group: int = 12) -> None:
        super().__init__()
        if not (cqt.center and cqt.pad_mode == "reflect" and cqt.output_format == "Magnitude"):
            raise ValueError("CroppedCQT expects a centred, reflect-padded magnitude CQT")
        self.hop = int(cqt.hop_length)
        self.width = int(cqt.kernel_width)
        self.half_width = self.width // 2
        real, imag = cqt.cqt_kernels_real[:, 0], cqt.cqt_kernels_imag[:, 0]
        scale = torch.sqrt(cqt.lenghts.view(-1, 1))
        self.spans: list[tuple[int, int, int, int]] = []  # (first bin, last bin+1, tap lo, hi)
        kernels = []
        nonzero = (real != 0) | (imag != 0)
        for b0 in range(0, real.size(0), group):
            b1 = min(b0 + group, real.size(0))
            taps = nonzero[b0:b1].any(0).nonzero()
            lo, hi = (int(taps.min()), int(taps.max()) + 1) if len(taps) else (0, 1)
            self.spans.append((b0, b1, lo, hi))
            kernels.append(torch.cat([real[b0:b1, lo:hi], imag[b0:b1, lo:hi]]).unsqueeze(1))
        self.kernels = kernels
        self.register_buffer("scale", scale, persistent=False)
        self.lo = min(s[2] for s in self.spans)
        self.hi = max(s[3] for s in self.spans)

    def n_frames(self, n: int) -> int:
        return (n + 2 * self.half_width - self.width) // self.hop + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) waveforms -> (B, bins, frames) magnitudes."""
        frames = self.n_frames(x.size(-1))
        xp = nn.functional.pad(x.unsqueeze(1), (self.half_width, self.half_width), mode="reflect")
        out = []
        for (b0, b1, lo, hi), k in zip(self.spans, self.kernels, strict=False):
            seg = xp[:, :, lo : lo + (frames - 1) * self.hop + (hi - lo)]
            ri = nn.functional.conv1d(seg, k.to(x.device), stride=self.hop)
            n = b1 - b0
            re, im = ri[:, :n] * self.scale[b0:b1], ri[:, n:] * self.scale[b0:b1]
            out.append(torch.sqrt(re.pow(2) + im.pow(2)))
        return torch.cat(out, dim=1)


class ShingleCQT:
    """Per-shingle CQT frames computed from one CQT of the whole track (see module doc)."""

    def __init__(self, cqt: CQT1992v2, pool: nn.Module) -> None:
        self.transform = CroppedCQT(cqt)
        self.pool = pool
        self.hop = self.transform.hop
        self.half_width = self.transform.half_width

    def supports(self, length: int, hop: int, min_length: int) -> bool:
        """Whether the shortcut applies: shingle starts on the CQT hop grid, overlap worth it."""
        if hop % self.hop or length < min_length or hop * 2 > length:
            return False
        first, last = self._edges(length)
        return 0 < first < last

    def _edges(self, length: int) -> tuple[int, int]:
        """First and last+1 frame whose nonzero kernel taps lie inside a shingle of `length`."""
        t = self.transform
        first = -(-(t.half_width - t.lo) // t.hop)
        last = (length - t.hi + t.half_width) // t.hop + 1
        return first, last

    def per_shingle(self, shingles: torch.Tensor) -> torch.Tensor:
        """(S, samples) -> pooled CQT (S, bins, frames), one transform per shingle."""
        return self.pool(self.transform(shingles))

    def __call__(self, x: torch.Tensor, length: int, hop: int) -> torch.Tensor:
        """1-D signal -> pooled CQT of each shingle (S, bins, frames)."""
        t = self.transform
        x = repeat_pad(x, padded_length(x.size(-1), length, hop))
        n_shingles = (x.size(-1) - length) // hop + 1
        whole = t(x.view(1, -1))[0]  # (bins, frames of the padded track)
        per = t.n_frames(length)
        first, last = self._edges(length)
        starts = torch.arange(n_shingles, device=x.device) * (hop // self.hop)
        idx = starts[:, None] + torch.arange(per, device=x.device)[None, :]
        frames = whole[:, idx].permute(1, 0, 2).contiguous()  # (S, bins, per)
        shingles = x.unfold(-1, length, hop)
        # Left edge: frames 0..first-1, reflected at each shingle's start.
        left_len = max((first - 1) * t.hop - t.half_width + t.hi, t.half_width + 1)
        frames[:, :, :first] = t(shingles[:, :left_len].contiguous())[:, :, :first]
        # Right edge: a slice starting on the hop grid, reflected at the shingle's end.
        r0 = (last * t.hop - t.half_width + t.lo) // t.hop * t.hop
        r0 = max(0, min(r0, (length - t.half_width - 1) // t.hop * t.hop))  # reflect needs > half
        right = t(shingles[:, r0:].contiguous())
        offset = r0 // t.hop
        frames[:, :, last:] = right[:, :, last - offset : per - offset]
        return self.pool(frames)
