"""Tests for model.audio: decoding every supported format, the reference's resampling, bad input."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf

from refrain.model import audio
from refrain.model.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    AudioTooLongError,
    audio_duration,
    load_audio,
    resample,
    to_mono,
)

DATA = Path(__file__).parent / "data" / "audio"
TIME_LIMIT_S = 10.0


def _music(sr: int, seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """Stereo (2, T) float32: four chords of harmonic tones with an attack/decay envelope."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    chords = [
        (220.0, 277.18, 329.63),
        (196.0, 246.94, 293.66),
        (174.61, 220.0, 261.63),
        (196.0, 246.94, 311.13),
    ]
    out = np.zeros((2, n))
    seg = n // len(chords)
    for i, chord in enumerate(chords):
        t = np.arange(seg) / sr
        env = np.minimum(1.0, t * 20) * np.exp(-0.8 * t)
        for f0 in chord:
            for h in range(1, 6):
                tone = env * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
                pan = rng.uniform(0.3, 0.7)
                out[0, i * seg : (i + 1) * seg] += pan * tone
                out[1, i * seg : (i + 1) * seg] += (1 - pan) * tone
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def _expected(x: np.ndarray, sr: int) -> np.ndarray:
    return resample(to_mono(x), sr, SAMPLE_RATE)


def _aligned_correlation(y: np.ndarray, ref: np.ndarray, max_lag: int) -> float:
    """Pearson correlation of y and ref after shifting y by the best lag within +-max_lag."""
    size = 1 << int(np.ceil(np.log2(len(y) + len(ref))))
    xc = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(ref, size)), size)
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    lag = int(lags[np.argmax(xc[lags])])
    a, b = (y[lag:], ref) if lag >= 0 else (y, ref[-lag:])
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _bounded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run fn in a thread and fail the test unless it returns or raises within TIME_LIMIT_S."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    assert not thread.is_alive(), f"{fn.__name__} did not finish within {TIME_LIMIT_S} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _can_encode(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # av.codec.codec.UnknownCodecError
        return False
    return True


def _write_pyav(path: Path, x: np.ndarray, sr: int, codec: str, rate: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        resampler = av.AudioResampler(
            format=stream.codec_context.format, layout="stereo", rate=rate
        )
        frame = av.AudioFrame.from_ndarray(x, format="fltp", layout="stereo")
        frame.sample_rate = sr
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))


@dataclass(frozen=True)
class Clip:
    path: Path
    source: np.ndarray  # (2, T) float32 signal that was encoded
    sr: int  # its sample rate
    exact: bool  # float samples stored as they are
    lossless: bool


# name -> (file name, rate of the source signal, writer or None where this build cannot encode it)
def _clip_specs() -> dict[str, tuple[str, int, Callable[[Path, np.ndarray, int], None] | None]]:
    def sf_writer(fmt: str, subtype: str) -> Callable[[Path, np.ndarray, int], None] | None:
        if not sf.check_format(fmt, subtype):
            return None
        return lambda p, x, sr: sf.write(p, x.T, sr, format=fmt, subtype=subtype)

    def av_writer(codec: str, rate: int) -> Callable[[Path, np.ndarray, int], None] | None:
        if not _can_encode(codec):
            return None
        return lambda p, x, sr: _write_pyav(p, x, sr, codec, rate)

    return {
        "wav_float": ("a.wav", 44100, sf_writer("WAV", "FLOAT")),
        "wav_pcm16": ("b.wav", 44100, sf_writer("WAV", "PCM_16")),
        "flac": ("a.flac", 44100, sf_writer("FLAC", "PCM_16")),
        "aiff": ("a.aiff", 44100, sf_writer("AIFF", "PCM_16")),
        "ogg_vorbis": ("a.ogg", 44100, sf_writer("OGG", "VORBIS")),
        "mp3_libsndfile": ("a.mp3", 44100, sf_writer("MP3", "MPEG_LAYER_III")),
        "opus_libsndfile": ("b.opus", 48000, sf_writer("OGG", "OPUS")),
        "opus_pyav": ("a.opus", 44100, av_writer("libopus", 48000)),
        "webm_opus": ("a.webm", 44100, av_writer("libopus", 48000)),
        "m4a_aac": ("a.m4a", 44100, av_writer("aac", 44100)),
        "mp3_lame": ("b.mp3", 44100, av_writer("libmp3lame", 44100)),
    }


LOSSLESS = {"wav_float", "wav_pcm16", "flac", "aiff"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Clip]:
    folder = tmp_path_factory.mktemp("clips")
    made = {}
    for name, (file_name, sr, writer) in _clip_specs().items():
        if writer is None:
            continue
        x = _music(sr)
        writer(folder / file_name, x, sr)
        made[name] = Clip(folder / file_name, x, sr, name == "wav_float", name in LOSSLESS)
    return made


@pytest.mark.parametrize("name", list(_clip_specs()))
def test_every_format_decodes_from_path_bytes_and_file(clips: dict[str, Clip], name: str) -> None:
    if name not in clips:
        pytest.skip(f"no encoder for {name} in this libsndfile/FFmpeg build")
    clip = clips[name]
    y = load_audio(clip.path)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(load_audio(str(clip.path)), y)
    np.testing.assert_array_equal(load_audio(clip.path.read_bytes()), y)
    with open(clip.path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), y)

    ref = _expected(clip.source, clip.sr)
    if clip.exact:
        np.testing.assert_array_equal(y, ref)
    elif clip.lossless:
        assert len(y) == len(ref)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)
    else:  # codec delay and padding, at most 0.1 s
        assert abs(len(y) - len(ref)) <= SAMPLE_RATE // 10
        assert _aligned_correlation(y, ref, max_lag=SAMPLE_RATE // 10) > 0.98


def test_other_source_kinds(clips: dict[str, Clip]) -> None:
    path = clips["flac"].path
    y = load_audio(path)
    data = path.read_bytes()

    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            return self._inner.readinto(b)

    for source in (bytearray(data), memoryview(data), Unseekable()):
        np.testing.assert_array_equal(load_audio(source), y)
    with pytest.raises(TypeError):
        load_audio(12345)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_audio(path.with_name("missing.flac"))


def test_golden_flac_matches_reference_loader() -> None:
    y = load_audio(DATA / "song75s_first12s.flac")
    ref = np.load(DATA / "wave16k_mono_first12s.npy")[0]
    assert y.shape == ref.shape == (12 * SAMPLE_RATE,)
    assert np.abs(y - ref).max() <= 1e-6


def test_mp3_matches_flac_length_and_both_decoders_agree() -> None:
    mp3 = load_audio(DATA / "song75s.mp3")
    flac = load_audio(DATA / "song75s.flac")
    assert len(mp3) == len(flac) == 75 * SAMPLE_RATE
    assert np.corrcoef(mp3, flac)[0, 1] > 0.99

    with open(DATA / "song75s.mp3", "rb") as f:
        via_sf, sr_sf, _ = audio._decode_soundfile(f, None)
        f.seek(0)
        via_av, sr_av, _ = audio._decode_pyav(f, None)
    assert sr_sf == sr_av == 44100 and len(via_sf) == len(via_av)
    diff = resample(via_sf, sr_sf, SAMPLE_RATE) - resample(via_av, sr_av, SAMPLE_RATE)
    assert np.abs(diff).max() <= 1e-5
    np.testing.assert_array_equal(mp3, resample(via_av, sr_av, SAMPLE_RATE))


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_both_decoders_scale_and_downmix_pcm_alike(subtype: str) -> None:
    data = _wav_bytes(_music(22050, seconds=1.0), 22050, subtype)
    via_sf, sr_sf, _ = audio._decode_soundfile(io.BytesIO(data), None)
    via_av, sr_av, _ = audio._decode_pyav(io.BytesIO(data), None)
    assert sr_sf == sr_av == 22050
    np.testing.assert_allclose(via_av, via_sf, rtol=0, atol=1e-7)


def test_stereo_downmix_is_channel_mean(tmp_path: Path) -> None:
    left = _music(SAMPLE_RATE)[0]
    silent_right = np.stack([left, np.zeros_like(left)])
    sf.write(tmp_path / "a.wav", silent_right.T, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), left / 2)

    x = _music(44100)
    x[1] = 0
    sf.write(tmp_path / "b.wav", x.T, 44100, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "b.wav"), resample(x[0] / 2, 44100, 16000))


def test_peak_guard_applies_only_when_resampling(tmp_path: Path) -> None:
    loud = 3 * _music(SAMPLE_RATE)[:1]
    sf.write(tmp_path / "native.wav", loud.T, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "native.wav"), loud[0])
    sf.write(tmp_path / "other.wav", loud.T, 22050, subtype="FLOAT")
    y = load_audio(tmp_path / "other.wav")
    assert np.abs(y).max() == pytest.approx(1.0)


def test_resample_follows_reference_scheme() -> None:
    x = _music(44100, seconds=1.0)
    x[1] *= 4  # only this channel clips after resampling
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 16000) and y.dtype == np.float32
    np.testing.assert_array_equal(y[0], resample(x[0], 44100, 16000))
    assert np.abs(y[1]).max() == pytest.approx(1.0)
    assert np.abs(y[0]).max() < 1.0
    np.testing.assert_array_equal(resample(x[:1], 44100, 16000)[0], y[0])
    np.testing.assert_array_equal(x, _music(44100, seconds=1.0) * np.array([[1], [4]], np.float32))


def test_to_mono() -> None:
    x = np.array([[1.0, 2.0], [3.0, -2.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_mono(x), [2.0, 0.0])
    np.testing.assert_array_equal(to_mono(x[0]), x[0])
    with pytest.raises(ValueError):
        to_mono(np.zeros((1, 2, 3)))


def _wav_bytes(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, x.T, sr, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _flac_of_unknown_length(x: np.ndarray, sr: int) -> bytes:
    """A FLAC stream whose STREAMINFO says 'total samples unknown', as streaming encoders write."""
    buffer = io.BytesIO()
    sf.write(buffer, x.T, sr, format="FLAC")
    data = bytearray(buffer.getvalue())
    # STREAMINFO starts at byte 8; its 64 bits at offset 10 end with the 36-bit sample count.
    packed = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


MALFORMED = (
    "empty",
    "random",
    "text",
    "riff_junk",
    "ogg_junk",
    "wav_no_frames",
    "mp3_header_only",
    "flac_header_only",
    "wav_nan",
    "wav_one_inf",
    "m4a_truncated",
)


@pytest.fixture(scope="module")
def malformed(clips: dict[str, Clip]) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    mp3 = (DATA / "song75s.mp3").read_bytes()
    cases = {
        "empty": b"",
        "random": rng.bytes(64_000),
        "text": b"not audio at all\n" * 500,
        "riff_junk": b"RIFF\x00\x10\x00\x00WAVE" + rng.bytes(4000),
        "ogg_junk": b"OggS\x00\x02" + bytes(20) + rng.bytes(4000),
        "wav_no_frames": _wav_bytes(np.zeros((2, 0), np.float32), 44100),
        "mp3_header_only": mp3[:700],
        "flac_header_only": (DATA / "song75s_first12s.flac").read_bytes()[:42],
        "wav_nan": _wav_bytes(np.full((1, 1000), np.nan, np.float32), 16000, "FLOAT"),
        "wav_one_inf": _wav_bytes(
            np.r_[np.zeros(99), np.inf][None].astype(np.float32), 16000, "FLOAT"
        ),
    }
    if "m4a_aac" in clips:
        m4a = clips["m4a_aac"].path.read_bytes()
        cases["m4a_truncated"] = m4a[: len(m4a) // 2]
    return cases


@pytest.mark.parametrize("case", MALFORMED)
def test_bad_input_raises_quickly(malformed: dict[str, bytes], case: str) -> None:
    if case not in malformed:
        pytest.skip("needs an AAC encoder")
    with pytest.raises(AudioDecodeError):
        _bounded(load_audio, malformed[case])


def test_damaged_files_decode_what_is_there_or_raise(clips: dict[str, Clip]) -> None:
    rng = np.random.default_rng(2)
    mp3 = (DATA / "song75s.mp3").read_bytes()
    truncated = _bounded(load_audio, mp3[: len(mp3) // 4])
    assert 15 * SAMPLE_RATE < len(truncated) < 22 * SAMPLE_RATE
    holed = _bounded(load_audio, mp3[:400_000] + rng.bytes(100_000) + mp3[500_000:])
    assert len(holed) > 60 * SAMPLE_RATE and np.isfinite(holed).all()

    for name, clip in clips.items():
        data = clip.path.read_bytes()
        for damaged in (data[: len(data) // 2], data[:1000] + rng.bytes(len(data) - 1000)):
            try:
                y = _bounded(load_audio, damaged)
            except AudioDecodeError:
                continue
            assert y.ndim == 1 and y.size > 0 and np.isfinite(y).all(), name


def test_empty_file_path(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="0 bytes"):
        load_audio(tmp_path / "empty.wav")


def test_too_long_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _wav_bytes(np.zeros((1, 60 * SAMPLE_RATE), np.float32), SAMPLE_RATE)
    reads: list[int] = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(
        sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k)
    )
    with pytest.raises(AudioTooLongError) as caught:
        _bounded(load_audio, data, max_duration_s=10)
    assert caught.value.duration_s == pytest.approx(60.0) and caught.value.limit_s == 10
    assert reads == []
    with pytest.raises(AudioTooLongError) as caught:
        audio._decode_pyav(io.BytesIO(data), 10)
    assert caught.value.duration_s == pytest.approx(60.0)
    assert len(load_audio(data, max_duration_s=60)) == 60 * SAMPLE_RATE


def test_too_long_is_caught_while_decoding_when_length_is_unknown() -> None:
    x = 0.1 * np.ones((1, 30 * SAMPLE_RATE), np.float32)
    data = _flac_of_unknown_length(x, SAMPLE_RATE)
    assert audio_duration(data) is None
    assert len(load_audio(data)) == 30 * SAMPLE_RATE
    for decode in (audio._decode_soundfile, audio._decode_pyav):
        with pytest.raises(AudioTooLongError) as caught:
            _bounded(decode, io.BytesIO(data), 5.0)
        assert 5.0 < caught.value.duration_s < 10.0
    with pytest.raises(AudioTooLongError):
        load_audio(data, max_duration_s=5.0)


def test_streaming_wav_header_without_data_size() -> None:
    x = _music(SAMPLE_RATE, seconds=3.0)
    data = bytearray(_wav_bytes(x, SAMPLE_RATE))
    at = data.find(b"data")
    data[at + 4 : at + 8] = bytes(4)  # what a writer that cannot seek back leaves
    y = load_audio(bytes(data))
    assert len(y) == 3 * SAMPLE_RATE
    np.testing.assert_allclose(y, to_mono(x), rtol=0, atol=1e-4)


def test_audio_duration(clips: dict[str, Clip]) -> None:
    assert audio_duration(_wav_bytes(np.zeros((2, 3 * 44100), np.float32), 44100)) == 3.0
    assert audio_duration(DATA / "song75s.mp3") == pytest.approx(75.0)
    if "m4a_aac" in clips:  # read by PyAV only
        assert audio_duration(clips["m4a_aac"].path) == pytest.approx(4.0, abs=0.1)
    with pytest.raises(AudioDecodeError):
        audio_duration(b"not audio at all\n" * 100)


def test_error_types() -> None:
    assert issubclass(AudioTooLongError, AudioDecodeError)
    assert issubclass(AudioDecodeError, ValueError)
    error = AudioTooLongError(12.5, 10.0)
    assert (error.duration_s, error.limit_s) == (12.5, 10.0)
    assert "10" in str(error) and "12.50" in str(error)
