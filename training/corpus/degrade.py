"""Mix degradations: what recording, mastering and distribution do to a rendering.

Each degradation is a frozen dataclass of its parameters with an `apply(x, sr, rng)` method on
float32 mono samples; `sample_degradations` draws a chain for one version. The chain runs in a
fixed order (EQ, reverb, compression, noise, then MP3), the order in which a real signal meets
them, and keeps the length of its input.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import av
import numpy as np
from scipy import signal

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96)  # kbps drawn for low-bitrate versions
# Centre frequencies (Hz) drawn for each kind of EQ band.
_EQ_RANGES = {"lowshelf": (60, 400), "highshelf": (1500, 6000), "peaking": (150, 5000)}


class _Step:
    kind: ClassVar[str]

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(cast("DataclassInstance", self))}  # each a dataclass


@dataclass(frozen=True)
class Band:
    kind: str  # "lowshelf", "highshelf" or "peaking"
    freq: float  # Hz
    gain_db: float
    q: float


@dataclass(frozen=True)
class Eq(_Step):
    bands: tuple[Band, ...]
    kind: ClassVar[str] = "eq"

    def apply(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        return equalize(x, sr, self.bands)


@dataclass(frozen=True)
class Reverb(_Step):
    rt60_s: float  # time for the impulse response to decay by 60 dB
    wet: float  # share of reverberated signal in the mix, 0..1
    predelay_ms: float
    kind: ClassVar[str] = "reverb"

    def apply(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        return reverberate(x, sr, self.rt60_s, self.wet, self.predelay_ms, rng)


@dataclass(frozen=True)
class Compressor(_Step):
    threshold_db: float  # relative to the signal's peak
    ratio: float
    attack_ms: float
    release_ms: float
    kind: ClassVar[str] = "compress"

    def apply(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        return compress(x, sr, self.threshold_db, self.ratio, self.attack_ms, self.release_ms)


@dataclass(frozen=True)
class Noise(_Step):
    snr_db: float
    colour: str  # "white", "pink" or "brown"
    kind: ClassVar[str] = "noise"

    def apply(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        return add_noise(x, self.snr_db, self.colour, rng)


@dataclass(frozen=True)
class Mp3(_Step):
    bitrate_kbps: int
    kind: ClassVar[str] = "mp3"

    def apply(self, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        return mp3_decode(mp3_encode(x, sr, self.bitrate_kbps), len(x))


Degradation = Eq | Reverb | Compressor | Noise | Mp3
_KINDS = {"eq": Eq, "reverb": Reverb, "compress": Compressor, "noise": Noise, "mp3": Mp3}


def degradation_from_json(d: dict) -> Degradation:
    d = dict(d)
    cls = _KINDS[d.pop("kind")]
    if cls is Eq:
        return Eq(tuple(Band(**b) for b in d["bands"]))
    return cls(**d)


def describe(chain: tuple[Degradation, ...]) -> str:
    """A short label of a chain for the manifest, e.g. "eq+reverb+mp3@48k"."""
    names = [f"mp3@{d.bitrate_kbps}k" if isinstance(d, Mp3) else d.kind for d in chain]
    return "+".join(names) or "none"


def sample_degradations(rng: np.random.Generator) -> tuple[Degradation, ...]:
    """Draw a chain: each degradation is present with its own probability."""

    def uniform(lo: float, hi: float, digits: int = 2) -> float:
        return round(float(rng.uniform(lo, hi)), digits)

    def log_uniform(lo: float, hi: float) -> float:
        return round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 1)

    chain: list[Degradation] = []
    if rng.random() < 0.6:
        bands = []
        for _ in range(int(rng.integers(1, 4))):
            kind = str(rng.choice(("lowshelf", "highshelf", "peaking")))
            freq = log_uniform(*_EQ_RANGES[kind])
            bands.append(Band(kind, freq, gain_db=uniform(-12, 12), q=uniform(0.5, 2.0, 3)))
        chain.append(Eq(tuple(bands)))
    if rng.random() < 0.5:
        chain.append(
            Reverb(rt60_s=uniform(0.3, 2.5), wet=uniform(0.1, 0.5), predelay_ms=uniform(0, 40, 1))
        )
    if rng.random() < 0.4:
        chain.append(
            Compressor(
                threshold_db=uniform(-30, -10),
                ratio=uniform(2, 8),
                attack_ms=uniform(2, 30, 1),
                release_ms=uniform(50, 400, 1),
            )
        )
    if rng.random() < 0.4:
        colour = str(rng.choice(("white", "pink", "brown")))
        chain.append(Noise(snr_db=uniform(5, 35), colour=colour))
    if rng.random() < 0.3:
        chain.append(Mp3(int(rng.choice(MP3_BITRATES))))
    return tuple(chain)


def apply_chain(
    x: np.ndarray, sr: int, chain: tuple[Degradation, ...], seed: int
) -> tuple[np.ndarray, bytes | None]:
    """Run `chain` on `x`. Returns the degraded samples and, when the chain ends in MP3, the
    encoded bytes (to be stored as they are); otherwise None."""
    rng = np.random.default_rng(seed)
    encoded = None
    for d in chain:
        if isinstance(d, Mp3):
            encoded = mp3_encode(x, sr, d.bitrate_kbps)
            x = mp3_decode(encoded, len(x))
        else:
            x = d.apply(x, sr, rng).astype(np.float32)
            encoded = None
    return x, encoded


def biquad(band: Band, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of an RBJ audio-EQ-cookbook shelving or peaking filter."""
    a_lin = 10.0 ** (band.gain_db / 40.0)
    w0 = 2.0 * np.pi * min(band.freq, 0.45 * sr) / sr
    cos, alpha = np.cos(w0), np.sin(w0) / (2.0 * band.q)
    if band.kind == "peaking":
        b = [1 + alpha * a_lin, -2 * cos, 1 - alpha * a_lin]
        a = [1 + alpha / a_lin, -2 * cos, 1 - alpha / a_lin]
    elif band.kind in ("lowshelf", "highshelf"):
        s = 1.0 if band.kind == "lowshelf" else -1.0
        root = 2.0 * np.sqrt(a_lin) * alpha
        b = [
            a_lin * ((a_lin + 1) - s * (a_lin - 1) * cos + root),
            s * 2 * a_lin * ((a_lin - 1) - s * (a_lin + 1) * cos),
            a_lin * ((a_lin + 1) - s * (a_lin - 1) * cos - root),
        ]
        a = [
            (a_lin + 1) + s * (a_lin - 1) * cos + root,
            -s * 2 * ((a_lin - 1) + s * (a_lin + 1) * cos),
            (a_lin + 1) + s * (a_lin - 1) * cos - root,
        ]
    else:
        raise ValueError(f"expected band kind lowshelf, highshelf or peaking, got {band.kind!r}")
    num, den = np.array(b), np.array(a)
    return num / den[0], den / den[0]


def equalize(x: np.ndarray, sr: int, bands: tuple[Band, ...]) -> np.ndarray:
    for band in bands:
        b, a = biquad(band, sr)
        x = signal.lfilter(b, a, x)
    return np.asarray(x, dtype=np.float32)


def impulse_response(sr: int, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise under an exponential envelope reaching -60 dB at `rt60_s`."""
    t = np.arange(int(rt60_s * sr)) / sr
    ir = rng.standard_normal(len(t)) * 10.0 ** (-3.0 * t / rt60_s)
    return ir / np.sqrt(np.sum(ir**2))


def reverberate(
    x: np.ndarray,
    sr: int,
    rt60_s: float,
    wet: float,
    predelay_ms: float,
    rng: np.random.Generator,
) -> np.ndarray:
    ir = impulse_response(sr, rt60_s, rng)
    ir = np.concatenate([np.zeros(int(predelay_ms * sr / 1000)), ir])
    tail = signal.fftconvolve(x, ir)[: len(x)]
    # Equal power in the dry and wet paths before mixing.
    dry_rms, wet_rms = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(tail**2))
    if wet_rms > 0:
        tail *= dry_rms / wet_rms
    return ((1.0 - wet) * x + wet * tail).astype(np.float32)


def compress(
    x: np.ndarray,
    sr: int,
    threshold_db: float,
    ratio: float,
    attack_ms: float,
    release_ms: float,
    hop: int = 32,
) -> np.ndarray:
    """Feed-forward compressor: RMS level over blocks of `hop` samples, gain smoothed with
    attack and release time constants, threshold relative to the peak level, make-up gain to
    the input's RMS."""
    n = len(x)
    blocks = -(-n // hop)
    padded = np.zeros(blocks * hop, dtype=np.float64)
    padded[:n] = x
    level = 10.0 * np.log10(np.mean(padded.reshape(blocks, hop) ** 2, axis=1) + 1e-12)
    threshold = threshold_db + level.max()
    target = -np.maximum(level - threshold, 0.0) * (1.0 - 1.0 / ratio)
    attack = np.exp(-hop / (sr * attack_ms / 1000.0))
    release = np.exp(-hop / (sr * release_ms / 1000.0))
    gain = np.empty_like(target)
    g = 0.0
    for i, t in enumerate(target.tolist()):
        c = attack if t < g else release
        g = c * g + (1.0 - c) * t
        gain[i] = g
    centres = (np.arange(blocks) + 0.5) * hop
    per_sample = 10.0 ** (np.interp(np.arange(n), centres, gain) / 20.0)
    y = x * per_sample
    rms_in, rms_out = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    return (y * (rms_in / rms_out if rms_out > 0 else 1.0)).astype(np.float32)


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    exponent = {"pink": 0.5, "brown": 1.0}.get(colour)
    if exponent is None:
        raise ValueError(f"expected noise colour white, pink or brown, got {colour!r}")
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / f**exponent, n)


def add_noise(x: np.ndarray, snr_db: float, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Add noise so that signal power over noise power is exactly `snr_db`."""
    noise = coloured_noise(len(x), colour, rng)
    p_signal, p_noise = np.mean(np.square(x, dtype=np.float64)), np.mean(noise**2)
    if p_signal == 0 or p_noise == 0:
        return x.astype(np.float32)
    noise *= np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (x + noise).astype(np.float32)


def mp3_encode(x: np.ndarray, sr: int, bitrate_kbps: int) -> bytes:
    """Encode mono samples to MP3 with libmp3lame (constant bit rate)."""
    if sr not in MP3_RATES:
        raise ValueError(f"expected an MP3 sample rate in {MP3_RATES}, got {sr}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=sr, layout="mono")
        stream.bit_rate = int(bitrate_kbps) * 1000
        peak = float(np.max(np.abs(x))) if len(x) else 0.0
        samples = (x / peak if peak > 1.0 else x).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def mp3_decode(data: bytes, length: int | None = None) -> np.ndarray:
    """Decode MP3 bytes to float32 mono; trimmed or zero-padded to `length` when given."""
    chunks = []
    with av.open(io.BytesIO(data), "r") as container:
        for frame in container.decode(audio=0):
            a = frame.to_ndarray()
            channels = len(frame.layout.channels)
            a = a if frame.format.is_planar else a.reshape(-1, channels).T
            chunks.append(a.mean(0))
    y = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if length is not None:
        y = np.pad(y[:length], (0, max(0, length - len(y))))
    return y
