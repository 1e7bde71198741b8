"""CQT-domain augmentations used in training: pitch roll, time stretch, SpecAugment, gain and
a random smooth equaliser (a timbre change the mixes of the corpus do not cover)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    pitch_p: float = 0.5  # probability of a pitch roll
    pitch_bins: int = 12  # roll by -bins..+bins CQT bins (semitones at 12 bins/octave)
    stretch_p: float = 0.5  # probability of a time stretch
    stretch_range: tuple[float, float] = (0.6, 1.8)  # time scale factors
    specaug_p: float = 0.3  # probability of SpecAugment
    specaug_f: float = 0.15  # largest masked fraction of bins
    specaug_t: float = 0.15  # largest masked fraction of frames
    gain_db: float = 6.0  # random gain on the magnitude (dB); the network normalises anyway
    eq_p: float = 0.0  # probability of a random equaliser curve over the CQT bins
    eq_db: float = 0.0  # its largest boost or cut (dB)


def time_stretch(x: torch.Tensor, rate: float, frames: int) -> torch.Tensor:
    """(bins, T) -> stretched by `rate` (>1 longer) and repeat-padded/cut to `frames`."""
    t = max(2, round(x.shape[-1] * rate))
    y = F.interpolate(x[None], size=t, mode="linear", align_corners=False)[0]
    if y.shape[-1] < frames:
        y = y.repeat(1, -(-frames // y.shape[-1]))
    return y[:, :frames]


def augment(x: torch.Tensor, config: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Pitch roll, SpecAugment and gain on one crop's CQT (bins, T); same shape out.

    Time stretch is applied when the crop is cut (`stretch_rate`), so that a stretched
    crop is made of real neighbouring frames rather than repeated ones.
    """

    def chance(p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=gen)) < p

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=gen))

    bins, frames = x.shape
    if chance(config.pitch_p):
        shift = int(torch.randint(-config.pitch_bins, config.pitch_bins + 1, (), generator=gen))
        x = torch.roll(x, shift, dims=0)
    if chance(config.specaug_p):
        x = x.clone()
        f = int(uniform(0, config.specaug_f) * bins)
        f0 = int(torch.randint(0, bins - f + 1, (), generator=gen))
        x[f0 : f0 + f] = 0
        t = int(uniform(0, config.specaug_t) * frames)
        t0 = int(torch.randint(0, frames - t + 1, (), generator=gen))
        x[:, t0 : t0 + t] = 0
    if config.eq_db and chance(config.eq_p):
        x = x * eq_curve(bins, config.eq_db, gen)[:, None]
    if config.gain_db:
        x = x * 10 ** (uniform(-config.gain_db, config.gain_db) / 20)
    return x


def eq_curve(bins: int, max_db: float, gen: torch.Generator, terms: int = 4) -> torch.Tensor:
    """A smooth random gain per CQT bin, within +-`max_db` dB: a sum of `terms` low-order
    cosines over the log-frequency axis (tilts, broad bumps and dips), as linear factors."""
    f = torch.linspace(0, math.pi, bins)
    k = torch.arange(1, terms + 1, dtype=torch.float32)
    amp = torch.randn(terms, generator=gen) / k  # smoother: less weight on higher orders
    phase = torch.rand(terms, generator=gen) * 2 * math.pi
    curve = (amp[:, None] * torch.cos(k[:, None] * f[None] + phase[:, None])).sum(0)
    peak = curve.abs().max().clamp_min(1e-6)
    depth = float(torch.rand((), generator=gen)) * max_db
    return 10 ** (curve / peak * depth / 20)


def stretch_rate(config: AugmentConfig, gen: torch.Generator) -> float:
    """A time-stretch factor for the next crop (1.0 when no stretch is drawn)."""
    if config.stretch_p <= 0 or float(torch.rand((), generator=gen)) >= config.stretch_p:
        return 1.0
    lo, hi = config.stretch_range
    return lo + (hi - lo) * float(torch.rand((), generator=gen))
