"""Real audio for the tests: synthetic songs, format encoding, clips and transformations."""

from __future__ import annotations

import io
import itertools
from fractions import Fraction

import av
import numpy as np
import soundfile as sf

SR = 44100


def synth_song(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """A stereo song: a chord progression, a bass line and a melody, all seeded."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    mono = np.zeros(n)
    beat = 60 / rng.uniform(80, 130)
    bar = 4 * beat
    key = int(rng.integers(0, 12))
    degrees = rng.choice([0, 2, 4, 5, 7, 9], size=int(seconds / bar) + 2)
    harmonics = rng.uniform(0.2, 1.0, size=6)
    for b, deg in enumerate(degrees):
        a, e = int(b * bar * sr), min(n, int((b + 1) * bar * sr))
        if a >= n:
            break
        tt = t[a:e]
        env = np.minimum(1, (tt - tt[0]) * 20) * np.exp(-(tt - tt[0]) * 0.8)
        root = 48 + key + deg
        for iv in (0, 4, 7):
            f = 440 * 2 ** ((root + iv - 69) / 12)
            for h, amp in enumerate(harmonics[:4], 1):
                mono[a:e] += 0.05 * amp / h * np.sin(2 * np.pi * f * h * tt) * env
        fb = 440 * 2 ** ((root - 12 - 69) / 12)
        mono[a:e] += 0.12 * np.sin(2 * np.pi * fb * tt) * env
        for k in range(4):  # melody: one note per beat
            na, ne = a + int(k * beat * sr), min(e, a + int((k + 1) * beat * sr))
            if na >= ne:
                break
            note = 72 + key + int(rng.choice([0, 2, 4, 5, 7, 9, 11, 12]))
            f = 440 * 2 ** ((note - 69) / 12)
            tn = t[na:ne] - t[na]
            mono[na:ne] += 0.1 * np.sin(2 * np.pi * f * tn) * np.exp(-tn * 3)
    mono += 0.002 * rng.standard_normal(n)
    stereo = np.stack([mono, 0.9 * mono + 0.001 * rng.standard_normal(n)], axis=1)
    return (0.8 * stereo / np.abs(stereo).max()).astype(np.float32)


def encode(x: np.ndarray, fmt: str, sr: int = SR) -> bytes:
    """Encode (T, C) float audio as wav, flac, ogg, mp3 (soundfile) or m4a, opus (PyAV)."""
    if fmt in ("wav", "flac", "ogg", "mp3"):
        buf = io.BytesIO()
        sub = {"ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}.get(fmt)
        # libsndfile's Vorbis encoder crashes on large single writes: write in blocks.
        with sf.SoundFile(buf, "w", sr, x.shape[1], subtype=sub, format=fmt.upper()) as f:
            for i in range(0, len(x), 16384):
                f.write(x[i : i + 16384])
        return buf.getvalue()
    codec, container, rate = {"m4a": ("aac", "mp4", sr), "opus": ("libopus", "ogg", 48000)}[fmt]
    if rate != sr:
        x = resample_linear(x, sr, rate)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo" if x.shape[1] == 2 else "mono")
        frame_len = 1024
        planar = np.ascontiguousarray(x.T.astype(np.float32))
        for i in range(0, planar.shape[1], frame_len):
            chunk = np.ascontiguousarray(planar[:, i : i + frame_len])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
            frame.sample_rate = rate
            frame.pts = i
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def resample_linear(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    n_out = round(len(x) * sr_out / sr_in)
    pos = np.arange(n_out) * (sr_in / sr_out)
    return np.stack([np.interp(pos, np.arange(len(x)), x[:, c]) for c in range(x.shape[1])], 1)


def ffmpeg_filter(x: np.ndarray, spec: str, sr: int = SR) -> np.ndarray:
    """Run (T, C) float audio through an FFmpeg filter chain (e.g. 'atempo=1.1')."""
    graph = av.filter.Graph()
    layout = "stereo" if x.shape[1] == 2 else "mono"
    src = graph.add_abuffer(format="fltp", sample_rate=sr, layout=layout, time_base=Fraction(1, sr))
    chain = [src]
    for part in (spec + f",aformat=sample_fmts=fltp:channel_layouts={layout}").split(","):
        name, _, args = part.partition("=")
        chain.append(graph.add(name, args or None))
    sink = graph.add("abuffersink")
    chain.append(sink)
    for a, b in itertools.pairwise(chain):
        a.link_to(b)
    graph.configure()
    out = []
    planar = np.ascontiguousarray(x.T.astype(np.float32))
    for i in range(0, planar.shape[1], 4096):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(planar[:, i : i + 4096]), format="fltp", layout=layout
        )
        frame.sample_rate = sr
        frame.pts = i
        frame.time_base = Fraction(1, sr)
        graph.push(frame)
        out.extend(_drain(graph))
    graph.push(None)
    out.extend(_drain(graph))
    y = np.concatenate([f.to_ndarray() for f in out], axis=1).T
    return y.astype(np.float32)


def _drain(graph) -> list:
    frames = []
    while True:
        try:
            frames.append(graph.pull())
        except (av.error.BlockingIOError, av.error.EOFError):
            return frames


def pitch_shift(x: np.ndarray, semitones: float, sr: int = SR) -> np.ndarray:
    """Pitch shift keeping the tempo: resample by 2^(s/12), then time-stretch back."""
    r = 2 ** (semitones / 12)
    return ffmpeg_filter(x, f"asetrate={int(sr * r)},aresample={sr},atempo={1 / r:.6f}", sr)


def time_stretch(x: np.ndarray, rate: float, sr: int = SR) -> np.ndarray:
    """Tempo change by `rate` (>1 faster) keeping the pitch."""
    return ffmpeg_filter(x, f"atempo={rate:.6f}", sr)
