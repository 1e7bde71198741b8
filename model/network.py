"""The CLEWS network: CQT front end, IBN residual backbone, GeM pooling, projection.

Module names follow the official implementation so that its state dicts load
unchanged (`cqt.0.cqt_kernels_real`, `frontend.1.weight`, `backbone.3.convs.0.bn.*`, ...).
"""

from __future__ import annotations

import math

import torch
from nnAudio.features import CQT1992v2
from torch import nn

from refrain.model.config import ModelConfig


class CQTNormalize(nn.Module):
    """Magnitude compression, per-segment min/max normalisation and a learned gain/bias.

    The official layer adds 1e-6 uniform noise (and normalises again) even in eval
    mode, which makes inference nondeterministic at the 1e-7 level. Here the noise is
    applied in training only; eval outputs differ from the official ones by ~2e-7.
    """

    def __init__(self, pow: float = 0.5, eps: float = 1e-6) -> None:
        super().__init__()
        self.pow = pow
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        h = h - h.amin(dim=(2, 3), keepdim=True)
        return h / (h.amax(dim=(2, 3), keepdim=True) + self.eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.normalize(h.clamp(min=0).pow(self.pow))
        if self.training:
            h = self.normalize(h + self.eps * torch.rand_like(h))
        return self.gain * h + self.bias


class InstanceBatchNorm2d(nn.Module):
    """Half the channels batch-normalised, the other half instance-normalised (IBN)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"IBN needs an even number of channels, got {channels}")
        self.bn = nn.BatchNorm2d(channels // 2)
        self.inst = nn.InstanceNorm2d(channels // 2, affine=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h1, h2 = torch.chunk(h, 2, dim=1)
        return torch.cat([self.bn(h1), self.inst(h2)], dim=1)


class PaddedConv2d(nn.Module):
    """Square-kernel convolution with 'same' padding."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h)


class ResBlock(nn.Module):
    """Pre-activation residual block with IBN and a learned, zero-initialised residual gain."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(1, int(max(cin, cout) * 0.5))
        mid += mid % 2
        self.convs = nn.Sequential(
            InstanceBatchNorm2d(cin),
            nn.ReLU(inplace=True),
            PaddedConv2d(cin, mid, stride=stride),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            PaddedConv2d(mid, cout),
        )
        if cin != cout or stride != 1:
            self.skip: nn.Module = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(inplace=True), PaddedConv2d(cin, cout, stride=stride)
            )
        else:
            self.skip = nn.Identity()
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gain * self.convs(h) + self.skip(h)


class GeMPool(nn.Module):
    """Generalised-mean pooling over all positions with a learned exponent 1 + softplus(p)."""

    def __init__(self, init: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(math.log(math.exp(init - 1) - 1) * torch.ones(1, 1, 1))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.flatten(start_dim=2)
        pow = 1 + nn.functional.softplus(self.p)
        return h.clamp(min=self.eps).pow(pow).mean(-1).pow(1 / pow.squeeze(-1))


def make_cqt(config: ModelConfig) -> nn.Sequential:
    """nnAudio CQT1992v2 followed by average pooling, as the official model builds it."""
    c = config.cqt
    return nn.Sequential(
        CQT1992v2(
            sr=config.sample_rate,
            hop_length=int(c.hoplen * config.sample_rate),
            n_bins=c.noctaves * c.nbinsoct,
            bins_per_octave=c.nbinsoct,
            filter_scale=c.fscale,
            trainable=False,
            verbose=False,
        ),
        nn.AvgPool1d(c.pool, stride=c.pool),
    )


class CLEWSNet(nn.Module):
    """Maps CQT segments (N, bins, frames) to embeddings (N, zdim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cqt = make_cqt(config)
        c0, c1 = config.frontend.channels
        self.frontend = nn.Sequential(
            CQTNormalize(pow=config.frontend.cqtpow),
            nn.Conv2d(1, c0, (12, 3), stride=(1, 2), bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c1, (12, 3), stride=2, bias=False),
        )
        blocks: list[nn.Module] = []
        cin = c1
        b = config.backbone
        for n, cout, stride in zip(b.blocks, b.channels, b.down, strict=False):
            blocks.append(ResBlock(cin, cout, stride=stride))
            blocks.extend(ResBlock(cout, cout) for _ in range(n - 1))
            cin = cout
        self.backbone = nn.Sequential(*blocks)
        self.pool = GeMPool()
        self.proj = nn.Sequential(nn.BatchNorm1d(cin), nn.Linear(cin, config.zdim, bias=False))

    def spectrogram(self, shingles: torch.Tensor) -> torch.Tensor:
        """Waveform shingles (N, samples) -> pooled CQT magnitudes (N, bins, frames)."""
        return self.cqt(shingles)

    def forward(self, cqt: torch.Tensor) -> torch.Tensor:
        """Pooled CQT segments (N, bins, frames) -> embeddings (N, zdim)."""
        h = self.frontend(cqt.unsqueeze(1))
        h = self.backbone(h)
        return self.proj(self.pool(h))
