"""Audio decoding, mono downmix and resampling, as the CLEWS reference prepares its input.

`load_audio` turns a path, bytes or a binary file object into float32 mono samples at 16 kHz.
libsndfile (soundfile) decodes what it can, PyAV (FFmpeg) the rest (M4A/AAC, WebM), and MP3
goes to PyAV first because the reference decodes MP3 with FFmpeg. Every failure on bad input
surfaces as `AudioDecodeError`, and decoding is bounded so that malformed input cannot hang.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import av
import av.error
import numpy as np
import soundfile as sf
import soxr

from refrain.model.truncation import missing_audio

SAMPLE_RATE = 16000

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

# Containers or codecs report lengths that differ from the decoded one by their padding.
_DURATION_SLACK_S = 0.5
_MIN_RATE, _MAX_RATE = 1000, 768000
_BLOCK_FRAMES = 1 << 18
# Packets in a row that yield no audio before PyAV decoding gives up on the input.
_MAX_IDLE_PACKETS = 256
# Demuxers PyAV may pick; the rest of FFmpeg's (playlists, images, text) never reach a decoder.
_PYAV_FORMATS = "wav,w64,flac,ogg,mp3,mov,aac,matroska,aiff,caf"
_PYAV_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError)
_SOUNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError)
_INT_SCALES = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}
_EXPECTED_FORMATS = "WAV, FLAC, OGG/Vorbis, Opus, MP3 or M4A/AAC"
# Full scale is 1. Float files may exceed it a little (or hold integer-scaled values), but a
# sample beyond this is not audio, and its square overflows float32 inside the CQT.
MAX_ABS_SAMPLE = 1e6


class AudioDecodeError(ValueError):
    """The input is not decodable audio (undecodable, empty, zero-length or non-finite)."""


class UnsupportedAudioError(AudioDecodeError):
    """The data is not audio in any supported format (as opposed to bad or empty audio)."""


class AudioTooLongError(AudioDecodeError):
    """The audio lasts longer than `limit_s`.

    `duration_s` is the container's length, or a lower bound (`exact=False`) when the limit was
    reached while decoding a stream that did not say how long it was.
    """

    def __init__(self, duration_s: float, limit_s: float, exact: bool = True) -> None:
        self.duration_s = duration_s
        self.limit_s = limit_s
        length = f"{duration_s:.2f} s" if exact else f"more than {duration_s:.2f} s"
        super().__init__(f"expected audio of at most {limit_s:g} s, got {length}")


class TruncatedAudioError(AudioDecodeError):
    """The stream ends well before the audio its container declares (a cut-off upload)."""


def load_audio(
    source: Source,
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
    complete: bool = False,
) -> np.ndarray:
    """Decode `source` to float32 mono samples at `sample_rate`, shape (T,).

    Channels are averaged, then the signal is resampled with `resample` unless it is already at
    `sample_rate`. Raises `AudioTooLongError` past `max_duration_s` (checked on the container's
    length before decoding and again while decoding) and `AudioDecodeError` for any other bad
    input. A path that cannot be opened raises the usual `OSError`.

    A damaged stream keeps what decoded before the damage; with `complete` (references, which
    must be whole), a stream ending more than 2 % (and 0.5 s) short of the audio its container
    declares (`refrain.model.truncation`: a header's length, a WAV or AIFF data chunk's size,
    an Ogg stream's end page) raises `TruncatedAudioError` instead.
    """
    if sample_rate <= 0:
        raise ValueError(f"expected a positive sample rate, got {sample_rate}")
    if max_duration_s is not None and max_duration_s <= 0:
        raise ValueError(f"expected a positive max_duration_s or None, got {max_duration_s}")
    with _open_input(source) as file:
        x, sr, declared_s = _decode(file, max_duration_s)
        if complete and sr > 0 and (missing := missing_audio(file, x.size / sr, declared_s)):
            raise TruncatedAudioError(missing)
    if x.size == 0:
        raise AudioDecodeError("expected at least one audio sample, got a zero-length stream")
    check_samples(x)
    if sr != sample_rate:
        x = resample(x, sr, sample_rate)
        if x.size == 0:
            raise AudioDecodeError(f"expected audio of at least 1/{sample_rate} s, got less")
    return x


def check_samples(x: np.ndarray) -> None:
    """AudioDecodeError unless every sample is finite and within +-MAX_ABS_SAMPLE."""
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise AudioDecodeError(f"expected finite samples, got {bad} NaN/inf of {x.size}")
    peak = float(np.abs(x).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioDecodeError(
            f"expected samples within +-{MAX_ABS_SAMPLE:g} (full scale is 1), got a peak of "
            f"{peak:.3g}"
        )


def audio_duration(source: Source) -> float | None:
    """Duration in seconds as the container reports it, without decoding; None if it does not."""
    with _open_input(source) as file:
        sf_opened = False
        try:
            with sf.SoundFile(file) as f:
                sf_opened = True
                frames = _known_frames(f.frames)
                if frames is not None and f.samplerate > 0:
                    return frames / f.samplerate
        except _SOUNDFILE_ERRORS:
            pass
        file.seek(0)
        try:
            with _open_pyav(file) as container:
                return _pyav_duration(container)
        except AudioDecodeError as e:
            if sf_opened:
                return None
            raise UnsupportedAudioError(f"expected {_EXPECTED_FORMATS} audio, got {e}") from e


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of (C, T) audio into (T,); 1-D audio is returned as is."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected audio of shape (T,) or (C, T), got shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # garbage floats: caught as non-finite
        return x.mean(axis=0)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample (T,) or (C, T) float32 audio as the reference does.

    soxr (default quality) at half gain, gain restored, then each channel is divided by
    max(1, its peak) so that resampling overshoot never clips.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected audio of shape (T,) or (C, T), got shape {x.shape}")
    y = soxr.resample(np.ascontiguousarray((x * np.float32(0.5)).T), sr_in, sr_out).T
    y = y * np.float32(2)
    if y.shape[-1] == 0:
        return y
    peak = np.abs(y).max(axis=-1, keepdims=True)
    return y / np.maximum(peak, np.float32(1))


@contextmanager
def _open_input(source: Source) -> Iterator[BinaryIO]:
    """A seekable binary file over `source`, positioned at its start; empty input is refused."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as opened:
            _require_content(opened)
            yield opened
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        file: BinaryIO = io.BytesIO(source)
    elif hasattr(source, "read"):
        if _seekable(source) and source.tell() == 0:
            file = source
        else:
            data = source.read()
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"expected a binary file object, got one that reads {type(data)}")
            file = io.BytesIO(data)
    else:
        raise TypeError(f"expected a path, bytes or a binary file object, got {type(source)}")
    _require_content(file)
    yield file


def _seekable(file: BinaryIO) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _require_content(file: BinaryIO) -> None:
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    if not size:
        raise AudioDecodeError("expected audio data, got 0 bytes")


Decoded = tuple[np.ndarray, int, float | None]  # samples, rate, the header's length (s)
Decoder = Callable[[BinaryIO, float | None], Decoded]


def _decode(file: BinaryIO, max_duration_s: float | None) -> Decoded:
    """Mono samples, their rate and the declared length from the first decoder that reads
    `file`."""
    failures: list[AudioDecodeError] = []
    empty: Decoded | None = None
    for decoder in _decoders(file):
        file.seek(0)
        try:
            x, sr, declared = decoder(file, max_duration_s)
        except AudioTooLongError:
            raise
        except AudioDecodeError as e:
            failures.append(e)
            continue
        if x.size:
            return x, sr, declared
        # A streaming WAV header says 0 bytes of data; libsndfile believes it, FFmpeg reads on.
        empty = x, sr, declared
    if empty is not None:
        return empty
    causes = "; ".join(str(e) for e in failures)
    raise UnsupportedAudioError(
        f"expected {_EXPECTED_FORMATS} audio, got undecodable data ({causes})"
    ) from failures[-1]


def _decoders(file: BinaryIO) -> tuple[Decoder, Decoder]:
    try:
        with sf.SoundFile(file) as f:
            is_mp3 = f.format == "MP3"
    except _SOUNDFILE_ERRORS:
        is_mp3 = False
    # FFmpeg is the reference's MP3 decoder and resyncs past corrupt frames where libsndfile stops.
    return (_decode_pyav, _decode_soundfile) if is_mp3 else (_decode_soundfile, _decode_pyav)


def _decode_soundfile(file: BinaryIO, max_duration_s: float | None) -> Decoded:
    blocks: list[np.ndarray] = []
    declared = None
    try:
        with sf.SoundFile(file) as f:
            sr = _check_rate(f.samplerate)
            frames = _known_frames(f.frames)
            if frames is not None:
                declared = frames / sr
                _check_duration(declared, max_duration_s)
            cap = _frame_cap(sr, max_duration_s)
            total = 0
            # Block reads: a header may claim any length, so never allocate from it.
            while True:
                want = _BLOCK_FRAMES if cap is None else min(_BLOCK_FRAMES, cap + 1 - total)
                block = f.read(want, dtype="float32", always_2d=True)
                if len(block):
                    blocks.append(to_mono(block.T))
                    total += len(block)
                if cap is not None and total > cap:
                    assert max_duration_s is not None  # a cap comes from a limit
                    raise AudioTooLongError(total / sr, max_duration_s, exact=False)
                if len(block) < want:
                    break
    except AudioDecodeError:
        raise
    except _SOUNDFILE_ERRORS as e:
        raise AudioDecodeError(f"libsndfile: {_reason(e)}") from e
    return _concat(blocks), sr, declared


@contextmanager
def _open_pyav(file: BinaryIO) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(
            file,
            "r",
            container_options={"format_whitelist": _PYAV_FORMATS},
            metadata_errors="ignore",
        )
    except _PYAV_ERRORS as e:
        raise AudioDecodeError(f"FFmpeg: {_reason(e)}") from e
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(f"FFmpeg: no audio stream in the {container.format.name} file")
        yield container


def _pyav_duration(container: av.container.InputContainer) -> float | None:
    stream = container.streams.audio[0]
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decode_pyav(file: BinaryIO, max_duration_s: float | None) -> Decoded:
    with _open_pyav(file) as container:
        duration = _pyav_duration(container)
        if duration is not None:
            _check_duration(duration, max_duration_s)
        stream = container.streams.audio[0]
        chunks: list[np.ndarray] = []
        total, sr, cap, idle = 0, 0, None, 0
        last_error: Exception | None = None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except _PYAV_ERRORS as e:
                if chunks:  # a truncated stream keeps what was decoded before the damage
                    break
                raise AudioDecodeError(f"FFmpeg: {_reason(e)}") from e
            try:
                frames = packet.decode()
            except _PYAV_ERRORS as e:
                frames, last_error = [], e
            idle = 0 if frames else idle + 1
            if idle > _MAX_IDLE_PACKETS:
                detail = f" (last error: {_reason(last_error)})" if last_error else ""
                raise AudioDecodeError(f"FFmpeg: no audio in {idle} packets in a row{detail}")
            for frame in frames:
                if not sr:
                    sr = _check_rate(frame.sample_rate)
                    cap = _frame_cap(sr, max_duration_s)
                elif frame.sample_rate != sr:
                    raise AudioDecodeError(
                        f"FFmpeg: sample rate changed mid-stream from {sr} to {frame.sample_rate}"
                    )
                chunks.append(_frame_to_mono(frame))
                total += frame.samples
            if cap is not None and total > cap:
                assert max_duration_s is not None  # a cap comes from a limit
                raise AudioTooLongError(total / sr, max_duration_s, exact=False)
    if not chunks and last_error is not None:
        raise AudioDecodeError(f"FFmpeg: {_reason(last_error)}") from last_error
    return _concat(chunks), sr or SAMPLE_RATE, duration


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Float32 channel mean of a decoded frame (FFmpeg's own downmix is scaled differently)."""
    x = frame.to_ndarray()
    if not frame.format.is_planar:
        x = x.reshape(-1, frame.layout.nb_channels).T
    kind = frame.format.name.removesuffix("p")
    if kind in _INT_SCALES:
        offset = 128.0 if kind == "u8" else 0.0
        x = (x.astype(np.float64) - offset) / _INT_SCALES[kind]
    return to_mono(x)  # float32 before the mean, as the reference's loader


def _reason(e: Exception) -> str:
    """The library's own words for a failure, without the object reprs around them."""
    return str(getattr(e, "error_string", None) or getattr(e, "strerror", None) or e).rstrip(".")


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _known_frames(frames: int) -> int | None:
    # libsndfile says 0 for streaming WAV headers and SF_COUNT_MAX for FLAC of unknown length.
    return frames if 0 < frames < 2**62 else None


def _check_rate(sr: int) -> int:
    if not _MIN_RATE <= sr <= _MAX_RATE:
        raise AudioDecodeError(f"expected a sample rate in [{_MIN_RATE}, {_MAX_RATE}] Hz, got {sr}")
    return int(sr)


def _check_duration(duration_s: float, max_duration_s: float | None) -> None:
    if max_duration_s is not None and duration_s > max_duration_s + _DURATION_SLACK_S:
        raise AudioTooLongError(duration_s, max_duration_s)


def _frame_cap(sr: int, max_duration_s: float | None) -> int | None:
    """Most frames a decoder may produce before the audio counts as too long."""
    if max_duration_s is None:
        return None
    return math.ceil((max_duration_s + _DURATION_SLACK_S) * sr)


# file name extensions read as audio when a folder is scanned
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".mp4")


def find_audio(inputs: list[str]) -> list[tuple[Path, Path]]:
    """Inputs -> (file, path relative to its input root) for every audio file."""
    found = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS:
                    found.append((f, f.relative_to(root)))
        elif root.is_file():
            found.append((root, Path(root.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {root}")
    return found
