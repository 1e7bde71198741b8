"""The aligned tune of a hit (`tune=true`): read along the alignment, then served by the real
HTTP server for a clip cut from a reference, null without the option, without verification
and for a reference stored by an older version (no contour)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from refrain.model.align import Alignment
from refrain.model.sequence import CONTOUR_RATE, Chromagram
from refrain.search.tune import TUNE_POINTS, aligned_tune
from refrain.service.settings import Settings

from conftest import LiveServer
from helpers import SR, synth_song

KEY = "tune-key"
AUTH = {"X-API-Key": KEY}
SONG_S = 40.0
CUT_S, CLIP_S = 12.0, 12.0


def match(q0: float, q1: float, r0: float, ratio: float = 1.0, key: int = 0) -> Alignment:
    return Alignment(q0, q1, r0, r0 + ratio * (q1 - q0), ratio, key, 10.0)


def test_the_reference_is_read_on_the_clips_time_axis():
    query = np.arange(50, dtype=np.float32)  # frame i holds pitch i (10 s at 5 frames a second)
    reference = np.arange(100, dtype=np.float32)
    t = aligned_tune(match(2.0, 6.0, 10.0, ratio=1.5, key=-2), query, reference)
    assert t is not None and t.rate == CONTOUR_RATE and t.key_shift == -2
    assert t.query.tolist() == list(range(10, 30))  # the clip's frames 2.0..6.0 s
    # point i's middle 2.1 + 0.2 i s of the clip is 10 + 1.5 (0.1 + 0.2 i) s of the reference
    assert t.reference.tolist() == [int(5 * (10 + 1.5 * (0.1 + 0.2 * i))) for i in range(20)]
    # past the reference's end: 0, as a rest
    t = aligned_tune(match(0.0, 4.0, 18.0), query, reference)
    assert t is not None and t.reference.tolist() == [*range(90, 100), *[0] * 10]


def test_a_long_match_is_capped_and_an_empty_one_has_no_tune():
    contour = np.full(1000, 60, np.float32)  # 200 s
    t = aligned_tune(match(0.0, 100.0, 0.0), contour, contour)
    assert t is not None and t.rate == CONTOUR_RATE / 2 and len(t.query) == 250 <= TUNE_POINTS
    t = aligned_tune(match(0.0, 80.0, 0.0), contour, contour)
    assert t is not None and t.rate == CONTOUR_RATE and len(t.query) == TUNE_POINTS
    assert aligned_tune(match(3.0, 3.0, 0.0), contour, contour) is None
    assert aligned_tune(match(0.0, 5.0, 0.0), contour, contour[:0]) is None


def wav(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def songs():
    return [synth_song(SONG_S, seed) for seed in (41, 42, 43, 44)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, songs):
    """The shipped model, three references stored with their tune and one stored as an older
    version stored it (no tune chroma, no contour): ingested through the same engine with a
    chromagram that leaves the tune out."""
    root = tmp_path_factory.mktemp("tune")
    srv = LiveServer(Settings(data_dir=root / "data", api_keys=KEY))
    engine = srv.app.state.runtime.core()
    with srv.client(headers=AUTH) as c:
        for i, song in enumerate(songs):
            older = i == len(songs) - 1
            if older:
                engine.chromagram = Chromagram(engine.model.config, tune=False)
            r = c.post(
                "/v1/tracks",
                files={"audio": (f"s{i}.wav", wav(song))},
                data={"track_id": "older" if older else f"song{i}"},
            )
            assert r.status_code == 201, r.text
    del engine.chromagram  # the service's own again, with the tune
    yield srv
    srv.stop()


def search(server, clip: np.ndarray, **fields: str) -> dict:
    with server.client(headers=AUTH) as c:
        r = c.post("/v1/search", files={"audio": ("clip.wav", wav(clip))}, data=fields)
    assert r.status_code == 200, r.text
    return r.json()


def pitches(values: list) -> np.ndarray:
    assert all(p is None or (isinstance(p, int) and 0 < p < 128) for p in values), values
    return np.array([0 if p is None else p for p in values])


def test_hits_carry_the_aligned_tune_when_asked(server, songs):
    clip = songs[0][int(CUT_S * SR) : int((CUT_S + CLIP_S) * SR)]
    body = search(server, clip, tune="true", top_k="4")
    top = body["results"][0]
    assert top["track_id"] == "song0" and top["alignment"] is not None
    tune, m = top["tune"], top["matches"][0]
    assert tune is not None
    assert tune["rate"] == CONTOUR_RATE
    assert tune["query_start_s"] == m["query_start_s"] and tune["ref_start_s"] == m["ref_start_s"]
    assert tune["tempo_ratio"] == m["tempo_ratio"] and tune["key_shift"] == m["key_shift"]
    n = len(tune["query"])
    assert n == len(tune["reference"]) and 0 < n <= TUNE_POINTS
    assert n == pytest.approx((m["query_end_s"] - m["query_start_s"]) * CONTOUR_RATE, abs=1)
    assert tune["query_end_s"] == pytest.approx(tune["query_start_s"] + n / CONTOUR_RATE)
    q, r = pitches(tune["query"]), pitches(tune["reference"])
    # the clip is the reference's own audio: a tune is heard in both, at the same places
    assert (q > 0).mean() > 0.3 and (r > 0).mean() > 0.3
    both = (q > 0) & (r > 0)
    assert both.sum() > 0.2 * n and (q[both] % 12 == r[both] % 12).mean() > 0.5
    for hit in body["results"]:  # every other tune has the same shape
        if hit["tune"] is not None:
            assert len(hit["tune"]["query"]) == len(hit["tune"]["reference"])
            pitches(hit["tune"]["query"] + hit["tune"]["reference"])

    # without the option, or without verification: null
    plain = search(server, clip, top_k="4")
    assert plain["results"][0]["track_id"] == "song0"
    assert all("tune" in h and h["tune"] is None for h in plain["results"])
    unverified = search(server, clip, tune="true", verify="false", top_k="4")
    assert all(h["tune"] is None for h in unverified["results"])


def test_a_reference_stored_without_its_contour_has_no_tune(server, songs):
    clip = songs[-1][int(CUT_S * SR) : int((CUT_S + CLIP_S) * SR)]
    top = search(server, clip, tune="true")["results"][0]
    assert top["track_id"] == "older"
    assert top["alignment"] is not None and top["matches"][0]["tempo_ratio"] is not None
    assert top["tune"] is None


def test_the_option_is_a_boolean(server, songs):
    clip = songs[0][: int(6 * SR)]
    with server.client(headers=AUTH) as c:
        r = c.post("/v1/search", files={"audio": ("clip.wav", wav(clip))}, data={"tune": "often"})
        assert r.status_code == 422, r.text
        r = c.post("/v1/search?tune=true", files={"audio": ("clip.wav", wav(clip))})
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_parameter"
