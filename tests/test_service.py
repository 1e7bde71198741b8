"""The REST service against a real uvicorn process on loopback, over httpx."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf

from refrain.service.settings import Settings

from conftest import CKPT_A
from helpers import SR, encode, pitch_shift, synth_song, time_stretch

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FORMATS = ["flac", "mp3", "ogg", "m4a", "wav", "opus"]


def settings(tmp_path, **kw) -> Settings:
    base = {
        "data_dir": tmp_path / "data",
        "model": str(CKPT_A),
        "api_keys": KEY,
        "max_query_s": 60.0,
        "max_reference_s": 200.0,
        "max_upload_bytes": 32 << 20,
    }
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def songs():
    return [synth_song(50.0, seed) for seed in range(6)]


def wav_bytes(x: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV")
    return buf.getvalue()


def add_catalog(client, songs) -> None:
    for i, song in enumerate(songs):
        fmt = FORMATS[i % len(FORMATS)]
        r = client.post(
            "/v1/tracks",
            headers=AUTH,
            files={"audio": (f"song{i}.{fmt}", encode(song, fmt))},
            data={"track_id": f"song{i}", "title": f"Song {i}", "work_id": f"work{i}"},
        )
        assert r.status_code == 201, r.text
        track = r.json()
        # Segments at a 5 s hop over the decoded length (codecs may add a few ms).
        assert track["n_segments"] == math.ceil((track["duration_s"] - 20) / 5 - 1e-9) + 1
        assert track["duration_s"] == pytest.approx(50.0, abs=0.1)


def test_catalog_search_localisation_and_restart(live_server, tmp_path, songs):
    # The shipped default model: clips must be told apart, which an untrained network cannot.
    server = live_server(settings(tmp_path, model=None))
    with server.client(headers=AUTH) as c:
        add_catalog(c, songs)
        for i, song in enumerate(songs):
            start = 8.0 + 5 * i
            clip = song[int(start * SR) : int((start + 10) * SR)]
            r = c.post("/v1/search", files={"audio": ("clip.wav", wav_bytes(clip))})
            assert r.status_code == 200, r.text
            body = r.json()
            top = body["results"][0]
            assert top["track_id"] == f"song{i}" and top["work_id"] == f"work{i}"
            assert 0 <= top["score"] <= 1 and top["distance"] >= 0
            assert top["transposition"] == 0  # only the clip as it is was tried
            assert body["query_duration_s"] == pytest.approx(10.0, abs=0.01)
            assert set(body["timings_ms"]) == {
                *("decode", "embed", "search", "reduce", "chroma", "verify")
            }
            m = top["matches"][0]
            # Verified: the aligned reference range is where the clip was cut, in tempo.
            # ranked on the upper chroma, located on the full one
            assert top["alignment"] > 0 and m["score"] > 0
            assert abs(m["ref_start_s"] - start) <= 1.5 and abs(m["ref_end_s"] - start - 10) <= 1.5
            assert m["tempo_ratio"] == pytest.approx(1.0, abs=0.03) and m["key_shift"] == 0
            assert m["distance"] is None
            # Without verification: segment ranges, which cover where the clip was cut.
            r = c.post(
                "/v1/search",
                files={"audio": ("clip.wav", wav_bytes(clip))},
                data={"verify": "false"},
            )
            body = r.json()
            top = body["results"][0]
            assert top["track_id"] == f"song{i}" and top["alignment"] is None
            assert set(body["timings_ms"]) == {"decode", "embed", "search", "reduce"}
            m = top["matches"][0]
            assert m["ref_start_s"] <= start + 1e-6 and m["ref_end_s"] >= start + 10 - 1e-6
            assert m["query_start_s"] == 0.0 and m["query_end_s"] == pytest.approx(10.0, abs=0.01)
            assert m["tempo_ratio"] is None and m["distance"] >= 0
        # Identical re-upload is a no-op, other content under the same id is a conflict.
        same = c.post(
            "/v1/tracks",
            headers=AUTH,
            data={"track_id": "song0"},
            files={"audio": ("a.flac", encode(songs[0], "flac"))},
        )
        assert same.status_code == 200 and same.json()["result"] == "unchanged"
        other = c.post(
            "/v1/tracks",
            headers=AUTH,
            data={"track_id": "song0"},
            files={"audio": ("a.flac", encode(songs[1], "flac"))},
        )
        assert other.status_code == 409
        page = c.get("/v1/tracks", params={"limit": 4}).json()
        assert len(page["tracks"]) == 4 and page["next_cursor"]
        rest = c.get("/v1/tracks", params={"limit": 4, "cursor": page["next_cursor"]}).json()
        assert [t["track_id"] for t in page["tracks"] + rest["tracks"]] == [
            f"song{i}" for i in range(6)
        ]
    server.stop()

    again = live_server(settings(tmp_path, model=None))
    with again.client(headers=AUTH) as c:
        stats = c.get("/v1/stats").json()
        assert stats["index"]["tracks"] == 6 and stats["index"]["segments"] >= 42
        clip = songs[3][int(20 * SR) : int(32 * SR)]
        top = c.post("/v1/search", files={"audio": ("c.wav", wav_bytes(clip))}).json()["results"][0]
        assert top["track_id"] == "song3"
        assert c.delete("/v1/tracks/song3", headers=AUTH).status_code == 200
        assert c.get("/v1/tracks/song3").status_code == 404
        ids = [
            r["track_id"]
            for r in c.post("/v1/search", files={"audio": ("c.wav", wav_bytes(clip))}).json()[
                "results"
            ]
        ]
        assert "song3" not in ids


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,transform",
    [
        ("pitch +2", lambda x: pitch_shift(x, 2.0)),
        ("pitch -3", lambda x: pitch_shift(x, -3.0)),
        ("tempo x1.15", lambda x: time_stretch(x, 1.15)),
        ("tempo x0.85", lambda x: time_stretch(x, 0.85)),
    ],
)
def test_transformed_clips_find_their_source(live_server, tmp_path, songs, name, transform):
    """Pitch-shifted and time-stretched clips still rank their source first (default model)."""
    server = live_server(settings(tmp_path, model=None))
    with server.client(headers=AUTH) as c:
        add_catalog(c, songs)
        for i, song in enumerate(songs):
            clip = transform(song[int(18 * SR) : int(30 * SR)])
            # Every key is tried (the default tries the clip as it is only).
            r = c.post(
                "/v1/search",
                files={"audio": ("clip.wav", wav_bytes(clip))},
                data={"transpositions": "6"},
            )
            assert r.status_code == 200, r.text
            top = r.json()["results"][0]
            assert top["track_id"] == f"song{i}", (name, i, r.json())


def test_bad_requests_get_json_errors_and_service_keeps_serving(live_server, tmp_path, songs):
    # reads open without a key (REFRAIN_OPEN_READS=true); writes still need one
    server = live_server(settings(tmp_path, max_upload_bytes=12 << 20, open_reads=True))
    silent = np.zeros((30 * SR, 2), dtype=np.float32)
    mp3 = encode(songs[0][: 20 * SR], "mp3")
    wav_header_only = wav_bytes(songs[0][:SR])[:44]
    too_long = encode(songs[0][: 40 * SR].repeat(2, axis=0)[: 65 * SR], "flac")
    cases = [
        ("non-audio", {"audio": ("x.wav", b"this is plain text, not audio at all" * 10)}, {}, 415),
        ("empty", {"audio": ("x.wav", b"")}, {}, 422),
        ("truncated mp3", {"audio": ("x.mp3", mp3[:300])}, {}, (415, 422)),
        ("wav header only", {"audio": ("x.wav", wav_header_only)}, {}, (415, 422)),
        ("0.1 s", {"audio": ("x.wav", wav_bytes(songs[0][: SR // 10]))}, {}, 422),
        ("silence", {"audio": ("x.wav", wav_bytes(silent))}, {}, 422),
        ("too long", {"audio": ("x.flac", too_long)}, {}, 422),
        (
            "unknown reduction",
            {"audio": ("x.wav", wav_bytes(songs[0][: 6 * SR]))},
            {"reduction": "median"},
            422,
        ),
        ("top_k=0", {"audio": ("x.wav", wav_bytes(songs[0][: 6 * SR]))}, {"top_k": "0"}, 422),
        (
            "top_k huge",
            {"audio": ("x.wav", wav_bytes(songs[0][: 6 * SR]))},
            {"top_k": "1000000"},
            422,
        ),
        ("top_k text", {"audio": ("x.wav", wav_bytes(songs[0][: 6 * SR]))}, {"top_k": "ten"}, 422),
        (
            "transpositions 7",
            {"audio": ("x.wav", wav_bytes(songs[0][: 6 * SR]))},
            {"transpositions": "7"},
            422,
        ),
        ("no audio field", {"other": ("x.wav", b"abc")}, {}, 422),
    ]
    good = wav_bytes(songs[0][: 8 * SR])
    with server.client() as c:
        for name, files, data, status in cases:
            r = c.post("/v1/search", files=files, data=data)
            expected = status if isinstance(status, tuple) else (status,)
            assert r.status_code in expected, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] and err["message"], name
            assert c.post("/v1/search", files={"audio": ("ok.wav", good)}).status_code == 200, name

        # Upload over the size limit: 413 from the Content-Length, before reading the body.
        big = b"\0" * (13 << 20)
        r = c.post("/v1/search", files={"audio": ("big.wav", big)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        # Writes need a valid key.
        files = {"audio": ("a.wav", good)}
        assert c.post("/v1/tracks", files=files).status_code == 401
        assert (
            c.post("/v1/tracks", files=files, headers={"Authorization": "Bearer wrong"}).status_code
            == 403
        )
        assert c.post("/v1/tracks", files=files, headers={"X-API-Key": KEY}).status_code == 201
        assert c.delete("/v1/tracks/anything").status_code == 401
        assert (
            c.post(
                "/v1/tracks", files=files, headers=AUTH, data={"track_id": "../../etc"}
            ).status_code
            == 422
        )

        metrics = c.get("/metrics").text
        assert 'refrain_errors_total{type="unsupported_audio"}' in metrics
        assert 'route="/v1/search",status="200"' in metrics
        assert "refrain_index_tracks 1.0" in metrics
        assert c.get("/healthz").json() == {"status": "alive"}


def test_readiness_and_closed_reads(live_server, tmp_path):
    """With keys configured, reads need one by default; probes and metrics stay open."""
    server = live_server(settings(tmp_path))
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        for path in ("/v1/tracks", "/v1/tracks/x", "/v1/stats", "/v1/jobs/" + "0" * 32):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-API-Key": "wrong"}).status_code == 403, path
        files = {"audio": ("q.wav", b"RIFF")}
        assert c.post("/v1/search", files=files).status_code == 401
        assert c.get("/v1/tracks", headers=AUTH).status_code == 200
        assert c.get("/v1/stats", headers={"X-API-Key": KEY}).json()["model"]["zdim"] == 128
        server.app.state.settings.protect_metrics = True
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=AUTH).status_code == 200
        assert c.get("/readyz").status_code == 200
        server.app.state.settings.open_reads = True  # REFRAIN_OPEN_READS=true
        assert c.get("/v1/tracks").status_code == 200
        assert c.post("/v1/tracks", files=files).status_code == 401  # writes still need one


def test_index_refuses_another_model(live_server, tmp_path):
    server = live_server(settings(tmp_path))
    server.stop()
    from conftest import LiveServer

    with pytest.raises(RuntimeError, match=r"another|different|model"):
        LiveServer(settings(tmp_path, model=None))
