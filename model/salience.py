"""Tune salience: where the tune is in a CQT, frame by frame.

A version keeps its tune and changes nearly everything else, so matching versions on the tune
leaves out the harmony, voicing and accompaniment that differ between them. `SalienceNet` is a
small convolutional network trained on the version corpus, whose renders know the tune's
pitch at every frame (`refrain.training.corpus.tune`): it reads the CQT (the unpooled one,
`Chromagram.cqt`, averaged to `RATE` frames per second) and gives, per frame, the probability
that no tune sounds and the probability of each of the CQT's 84 semitones (C1 to B7) being the
tune's pitch.

Its input stacks the CQT shifted by the offsets of the first harmonics (`HARMONICS`, as in
harmonic-CQT salience models) so that the first layer sees a pitch's partials side by side;
an octave-wide layer and a time-wide layer then decide which of the pitches sounding is the
tune's. `TuneSalience` loads a trained network and turns its output into what verification
and the console use: the tune's 12-bin chroma at any frame rate, and the tune as a pitch
contour.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

BINS = 84  # the CQT's bins: 7 octaves of semitones from C1
LOWEST_MIDI = 24  # the MIDI pitch of bin 0 (C1)
CQT_RATE = 50.0  # frames per second of the unpooled CQT (`ModelConfig.cqt.hoplen` 20 ms)
POOL = 2  # CQT frames averaged into one salience frame
RATE = CQT_RATE / POOL  # salience frames per second
FLOOR_DB = 80.0  # the feature range below the clip's loudest bin
HARMONICS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
DEFAULT_SALIENCE = Path(__file__).parent / "weights" / "salience"
WEIGHTS = "salience.safetensors"
CONFIG = "salience.json"


@dataclass(frozen=True)
class SalienceConfig:
    channels: int = 16
    harmonics: tuple[float, ...] = HARMONICS

    @classmethod
    def from_dict(cls, d: dict) -> SalienceConfig:
        return cls(int(d["channels"]), tuple(float(h) for h in d["harmonics"]))


def features(cqt: np.ndarray | torch.Tensor) -> torch.Tensor:
    """CQT magnitudes (84, frames) at `CQT_RATE` -> the network's input (84, frames // 2):
    pairs of frames averaged, in decibels below the clip's loudest bin, scaled from
    -`FLOOR_DB` (0) to 0 dB (1)."""
    x = torch.as_tensor(np.asarray(cqt, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] != BINS:
        raise ValueError(f"expected a CQT of shape ({BINS}, frames), got {tuple(x.shape)}")
    frames = max(1, x.shape[1] // POOL) * POOL
    if x.shape[1] < frames:  # a single frame: repeat it
        x = x.repeat(1, POOL)
    x = x[:, :frames].reshape(BINS, -1, POOL).mean(-1)
    db = 20.0 * torch.log10(x.clamp(min=1e-10) / x.max().clamp(min=1e-10))
    return ((db + FLOOR_DB) / FLOOR_DB).clamp(0.0, 1.0)


def quantise(feats: torch.Tensor) -> np.ndarray:
    """`features` as one byte each (the training cache's form)."""
    return np.round(feats.numpy() * 255).astype(np.uint8)


def dequantise(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.astype(np.float32) / 255)


def _shift(x: torch.Tensor, bins: int) -> torch.Tensor:
    """x (B, F, T) with bin f holding x's bin f + `bins` (zero beyond the edges)."""
    if bins == 0:
        return x
    out = torch.zeros_like(x)
    if bins > 0:
        out[:, :-bins] = x[:, bins:]
    else:
        out[:, -bins:] = x[:, :bins]
    return out


def _block(cin: int, cout: int, kernel: tuple[int, int]) -> nn.Sequential:
    pad = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SalienceNet(nn.Module):
    """Features (B, 84, T) -> logits (B, T, 85): column 0 no tune, column 1 + k the tune at
    CQT bin k."""

    def __init__(self, config: SalienceConfig | None = None) -> None:
        super().__init__()
        self.config = config or SalienceConfig()
        c = self.config.channels
        self.offsets = [round(12 * np.log2(h)) for h in self.config.harmonics]
        self.layers = nn.Sequential(
            _block(len(self.offsets), c, (5, 5)),
            _block(c, c, (5, 5)),
            _block(c, c, (13, 3)),  # an octave each way: which partial is the tune's
            _block(c, c, (3, 9)),  # a third of a second each way
        )
        self.pitch = nn.Conv2d(c, 1, 1)
        self.unvoiced = nn.Conv1d(2 * c, 1, 5, padding=2)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = torch.stack([_shift(feats, k) for k in self.offsets], dim=1)  # (B, H, F, T)
        h = self.layers(h)
        pitch = self.pitch(h)[:, 0]  # (B, F, T)
        pooled = torch.cat([h.mean(2), h.amax(2)], dim=1)  # (B, 2C, T)
        rest = self.unvoiced(pooled)  # (B, 1, T)
        return torch.cat([rest, pitch], dim=1).transpose(1, 2)


class TuneSalience:
    """A trained `SalienceNet` on the CPU, and what is read from its output."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else DEFAULT_SALIENCE
        config = SalienceConfig.from_dict(json.loads((folder / CONFIG).read_text()))
        self.net = SalienceNet(config)
        self.net.load_state_dict(load_file(str(folder / WEIGHTS)))
        self.net.eval()
        self.folder = folder

    @torch.inference_mode()
    def probabilities(self, cqt: np.ndarray | torch.Tensor) -> np.ndarray:
        """CQT (84, frames) at `CQT_RATE` -> (frames // 2, 85) probabilities at `RATE`:
        column 0 no tune, column 1 + k the tune at bin k."""
        feats = features(cqt)
        logits = self.net(feats.unsqueeze(0))[0]
        return torch.softmax(logits, dim=-1).numpy()


@functools.lru_cache(maxsize=1)
def default_salience() -> TuneSalience:
    """The shipped salience network, loaded once."""
    return TuneSalience()


def frame_probabilities(cqt: np.ndarray) -> np.ndarray:
    """The shipped network's `probabilities` back at the CQT's rate (each salience frame
    repeated): (frames, 85), so that what is folded from them has the frames of every other
    chroma of the same CQT."""
    probs = default_salience().probabilities(cqt)
    frames = cqt.shape[1]
    probs = np.repeat(probs, POOL, axis=0)[:frames]
    if len(probs) < frames:
        probs = np.concatenate([probs, np.repeat(probs[-1:], frames - len(probs), axis=0)])
    return probs


def contour_of(probs: np.ndarray, per_frame: int) -> np.ndarray:
    """`probabilities` -> the tune's MIDI pitch per group of `per_frame` frames: the median
    pitch of its voiced frames where more than half are voiced, else 0 (a rest)."""
    melody = melody_of(probs)
    out = np.zeros(-(-len(melody) // per_frame), np.float32)
    for k in range(len(out)):
        group = melody[k * per_frame : (k + 1) * per_frame]
        voiced = group[group > 0]
        if 2 * len(voiced) > len(group):
            out[k] = np.round(np.median(voiced))
    return out


def melody_of(probs: np.ndarray) -> np.ndarray:
    """`TuneSalience.probabilities` -> (frames,) the tune's MIDI pitch per frame, 0 where it
    rests (where no tune is likelier than every pitch together)."""
    pitch = probs[:, 1:]
    voiced = pitch.sum(1) > probs[:, 0]
    return np.where(voiced, pitch.argmax(1) + LOWEST_MIDI, 0).astype(np.float32)


def tune_chroma(probs: np.ndarray, per_frame: int) -> np.ndarray:
    """Pitch probabilities folded to pitch classes and pooled, like `fold_chroma`."""
    from .qmax import fold_chroma

    return fold_chroma(np.ascontiguousarray(probs[:, 1:].T), per_frame)


def save(net: SalienceNet, folder: str | os.PathLike) -> Path:
    """Write `net` where `TuneSalience` reads it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(net.config)) + "\n")
    return folder
