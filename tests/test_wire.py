"""One wire format: the engine's typed results, encoded by `schemas` into the documented
models, are what the routes answer, byte for byte, on a real search against a real index."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib.metadata import version

import pytest

import refrain
from refrain.index import AddResult, TrackRecord
from refrain.model.align import Alignment
from refrain.search.ranking import SegmentMatch
from refrain.service import schemas
from refrain.service.app import create_app
from refrain.service.engine import SearchRequest, SearchResult
from refrain.service.settings import Settings
from refrain.service.worker_app import create_worker_app

from conftest import CKPT_A, LiveServer
from helpers import SR, encode, synth_song

KEY = {"Authorization": "Bearer k1"}
MATCH_FIELDS = [
    "query_start_s",
    "query_end_s",
    "ref_start_s",
    "ref_end_s",
    "distance",
    "tempo_ratio",
    "key_shift",
    "score",
]
ALIGNED_ONLY = ("tempo_ratio", "key_shift", "score")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("wire") / "data"
    srv = LiveServer(Settings(data_dir=data, model=str(CKPT_A), api_keys="k1", min_free_bytes=0))
    songs = [synth_song(30.0, seed) for seed in range(3)]
    with srv.client(headers=KEY) as c:
        for i, song in enumerate(songs):
            r = c.post(
                "/v1/tracks",
                files={"audio": (f"s{i}.wav", encode(song, "wav"))},
                data={"track_id": f"s{i}", "title": f"Sóng {i}", "work_id": f"w{i}" * (i != 1)},
            )
            assert r.status_code == 201, r.text
    srv.clip = encode(songs[1][8 * SR : 20 * SR], "wav")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def results(server) -> list[SearchResult]:
    engine = server.app.state.runtime.engine
    clip = server.clip
    return [
        engine.search(SearchRequest(clip, top_k=3)),  # aligned matches
        engine.search(SearchRequest(clip, top_k=3, verify=False)),  # segment matches
        engine.search(SearchRequest(clip, top_k=2, transpositions=1)),
    ]


def test_every_search_result_encodes_into_the_documented_response(results):
    kinds = set()
    for result in results:
        encoded = schemas.search_response(result)
        body = encoded.model_dump(mode="json")
        assert schemas.SearchResponse.model_validate(body) == encoded
        assert body["query_duration_s"] == round(result.query_duration_s, 3)
        assert list(body["timings_ms"]) == list(result.timings_s)
        assert body["timings_ms"]["embed"] == round(result.timings_s["embed"] * 1000, 2)
        assert [h["track_id"] for h in body["results"]] == [h.track.track_id for h in result.hits]
        for hit, h in zip(body["results"], result.hits, strict=True):
            assert list(hit) == list(schemas.Hit.model_fields)
            assert hit["score"] == round(h.score, 6) and hit["distance"] == h.distance
            assert hit["title"] == h.track.title and hit["work_id"] == h.track.work_id
            assert hit["alignment"] == h.alignment and hit["transposition"] == h.transposition
            assert len(hit["matches"]) == len(h.matches) > 0
            for m, raw in zip(hit["matches"], h.matches, strict=True):
                assert list(m) == MATCH_FIELDS  # one shape for both kinds
                if isinstance(raw, Alignment):
                    kinds.add("aligned")
                    assert m["distance"] is None and m["tempo_ratio"] == raw.tempo_ratio
                    assert (m["key_shift"], m["score"]) == (raw.key_shift, raw.score)
                else:
                    kinds.add("segment")
                    assert isinstance(raw, SegmentMatch) and m["distance"] == raw.distance
                    assert all(m[k] is None for k in ALIGNED_ONLY)
                assert m["query_start_s"] == raw.query_start_s
                assert m["ref_end_s"] == raw.ref_end_s
    assert kinds == {"aligned", "segment"}
    assert results[0].hits[0].track.track_id == "s1" and results[0].hits[0].alignment
    no_work = next(h for h in results[1].hits if h.track.track_id == "s1")
    assert schemas.hit(no_work).work_id is None


def test_the_search_route_answers_what_the_encoder_writes(server, results, monkeypatch):
    engine = server.app.state.runtime.engine
    with server.client(headers=KEY) as c:
        for result in results:
            monkeypatch.setattr(engine, "search", lambda request, result=result: result)
            r = c.post("/v1/search", files={"audio": ("clip.wav", server.clip)})
            assert r.status_code == 200, r.text
            assert r.content == schemas.search_response(result).model_dump_json().encode()


def test_the_track_routes_answer_what_the_encoder_writes(server):
    engine = server.app.state.runtime.engine
    with server.client(headers=KEY) as c:
        stored = engine.get_track("s2")
        r = c.get("/v1/tracks/s2")
        assert r.content == schemas.track(stored).model_dump_json().encode()
        page, cursor = engine.list_tracks(2)
        r = c.get("/v1/tracks", params={"limit": 2})
        assert r.content == schemas.track_page(page, cursor).model_dump_json().encode()
        assert r.json()["next_cursor"] == "s1"
        song = encode(synth_song(30.0, 2), "wav")  # s2's audio again: nothing written
        r = c.post("/v1/tracks", files={"audio": ("s2.wav", song)}, data={"track_id": "s2"})
        assert r.status_code == 200
        body = schemas.added_track(AddResult.UNCHANGED, stored).model_dump()
        assert r.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        assert list(r.json()) == [*schemas.Track.model_fields, "result"]
        stats = c.get("/v1/stats").json()
        assert list(stats["index"]) == list(schemas.IndexSummary.model_fields)
        assert stats["index"]["tracks"] == 3


def test_a_track_is_encoded_without_what_the_service_keeps_to_itself():
    record = TrackRecord("a/b", "T", "A", "w", 12.5, "f" * 64, 3, 1.5, sequence=b"\x01\x02")
    body = schemas.track(record).model_dump()
    assert body == {
        "track_id": "a/b",
        "title": "T",
        "artist": "A",
        "work_id": "w",
        "duration_s": 12.5,
        "content_sha256": "f" * 64,
        "n_segments": 3,
        "added_at": 1.5,
    }
    added = schemas.added_track(AddResult.REPLACED, replace(record, sequence=None)).model_dump()
    assert added == {**body, "result": "replaced"}


def test_the_version_is_the_package_version(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    assert refrain.__version__ == version("refrain")
    assert create_app(settings).openapi()["info"]["version"] == refrain.__version__
    assert create_worker_app(settings).openapi()["info"]["version"] == refrain.__version__
