"""One rule for every format: a reference that holds less audio than its container declares
is `TruncatedAudioError` (with `complete`), and `POST /v1/tracks` answers 422 truncated_audio.
FLAC and MP3 declare a length, WAV and AIFF the size of their data chunk, Ogg an end-of-stream
page; a whole file of every format still decodes, and a query keeps what a cut file holds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_audio import _clip_specs, _flac_of_unknown_length, _music

from refrain.model.audio import SAMPLE_RATE, TruncatedAudioError, load_audio
from refrain.service.settings import Settings

from conftest import CKPT_A, LiveServer
from helpers import SR, encode, synth_song

SONG = synth_song(20.0, seed=5)
KEY = {"Authorization": "Bearer k1"}


def soundfile_bytes(x: np.ndarray, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, x, SR, format=fmt, subtype=subtype)
    return buffer.getvalue()


# format -> the 20 s song in it
WRITERS = {
    "wav": lambda x: encode(x, "wav"),
    "wav_float_extensible": lambda x: soundfile_bytes(x, "WAVEX", "FLOAT"),
    "rf64": lambda x: soundfile_bytes(x, "RF64"),
    "aiff": lambda x: soundfile_bytes(x, "AIFF"),
    "flac": lambda x: encode(x, "flac"),
    "mp3": lambda x: encode(x, "mp3"),
    "ogg_vorbis": lambda x: encode(x, "ogg"),
    "ogg_opus": lambda x: encode(x, "opus"),
}


@pytest.fixture(scope="module")
def whole() -> dict[str, bytes]:
    return {name: write(SONG) for name, write in WRITERS.items()}


def lying_wav(seconds: float = 5.0, declared_bytes: int = 2_000_000_000) -> bytes:
    """A 16-bit stereo WAV holding `seconds` of audio whose data chunk declares 2 GB."""
    data = bytearray(encode(synth_song(seconds, seed=6), "wav"))
    at = data.find(b"data")
    data[at + 4 : at + 8] = declared_bytes.to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_whole_file_is_complete(whole: dict[str, bytes], name: str) -> None:
    y = load_audio(whole[name], complete=True)
    assert abs(len(y) - 20 * SAMPLE_RATE) <= SAMPLE_RATE // 10
    np.testing.assert_array_equal(y, load_audio(whole[name]))


def test_whole_files_of_the_decoding_tests_are_complete(tmp_path: Path) -> None:
    """Every format tests/test_audio.py decodes (PyAV's Opus, WebM and M4A/AAC among them)."""
    written = 0
    for name, (file_name, sr, writer) in _clip_specs().items():
        if writer is None:
            continue
        writer(tmp_path / file_name, _music(sr), sr)
        y = load_audio(tmp_path / file_name, complete=True)
        assert abs(len(y) - 4 * SAMPLE_RATE) <= SAMPLE_RATE // 10, name
        written += 1
    assert written >= 4


@pytest.mark.parametrize("name", list(WRITERS))
def test_the_first_quarter_of_a_file_is_truncated(whole: dict[str, bytes], name: str) -> None:
    cut = whole[name][: len(whole[name]) // 4]
    with pytest.raises(TruncatedAudioError, match=r"the audio ends after [3-6]\.\d\d s"):
        load_audio(cut, complete=True)
    kept = load_audio(cut)  # a query clip is searched with what it holds
    assert 3 * SAMPLE_RATE < len(kept) < 6 * SAMPLE_RATE


def test_a_wav_declaring_more_data_than_it_holds_is_truncated() -> None:
    data = lying_wav()
    with pytest.raises(TruncatedAudioError, match=r"after 5\.00 s of the 11337\.87 s its header"):
        load_audio(data, complete=True)
    assert len(load_audio(data)) == 5 * SAMPLE_RATE


@pytest.mark.parametrize("name", ["wav", "aiff", "flac"])
def test_a_file_short_by_less_than_the_codec_slack_is_whole(
    whole: dict[str, bytes], name: str
) -> None:
    """Up to 2 % (and 0.5 s) short of the declared length is padding, not truncation."""
    data = whole[name]
    y = load_audio(data[: int(len(data) * 0.995)], complete=True)
    assert 19.5 * SAMPLE_RATE < len(y) < 20 * SAMPLE_RATE


@pytest.mark.parametrize("name", ["ogg_vorbis", "ogg_opus"])
def test_an_ogg_stream_without_its_last_page_is_truncated(
    whole: dict[str, bytes], name: str
) -> None:
    """Ogg declares no length, only its end: a stream missing the end page is cut off."""
    data = whole[name]
    last_page = data.rfind(b"OggS")
    with pytest.raises(TruncatedAudioError, match="end-of-stream page"):
        load_audio(data[:last_page], complete=True)


def test_lengths_a_container_does_not_state_are_not_held_against_it() -> None:
    streaming = bytearray(encode(SONG, "wav"))
    at = streaming.find(b"data")
    streaming[at + 4 : at + 8] = bytes(4)  # a writer that cannot seek back
    assert len(load_audio(bytes(streaming), complete=True)) == 20 * SAMPLE_RATE
    unknown = _flac_of_unknown_length(SONG.T, SR)
    assert len(load_audio(unknown, complete=True)) == 20 * SAMPLE_RATE
    junk_after = encode(SONG, "ogg") + b"\x00" * 1000  # bytes after the end page
    assert abs(len(load_audio(junk_after, complete=True)) - 20 * SAMPLE_RATE) < SAMPLE_RATE // 10


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("truncation") / "data"
    settings = Settings(data_dir=data, model=str(CKPT_A), api_keys="k1", min_free_bytes=0)
    server = LiveServer(settings)
    with server.client(headers=KEY) as c:
        yield c
    server.stop()


@pytest.mark.parametrize("case", ["ogg_vorbis", "lying_wav"])
def test_post_tracks_refuses_a_truncated_reference(client, whole, case: str) -> None:
    if case == "lying_wav":
        name, data = "lying.wav", lying_wav()
    else:
        name, data = "cut.ogg", whole[case][: len(whole[case]) // 4]
    r = client.post("/v1/tracks", files={"audio": (name, data)}, data={"track_id": case})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "truncated_audio" and "a truncated file?" in err["message"]
    assert client.get(f"/v1/tracks/{case}").status_code == 404


def test_post_tracks_stores_a_whole_ogg(client, whole) -> None:
    r = client.post(
        "/v1/tracks",
        files={"audio": ("whole.ogg", whole["ogg_vorbis"])},
        data={"track_id": "whole-ogg"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["duration_s"] == pytest.approx(20.0, abs=0.1)
