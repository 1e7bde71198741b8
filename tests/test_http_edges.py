"""The edges of the HTTP layer an outside fuzz and abuse run found, against a live uvicorn
server: malformed and oversized multipart bodies, wrong content types, `Allow` on 405, unknown
query parameters and form fields, and clips outside the lengths the model does well on. Each
answer is a JSON error with a specific code and a status the OpenAPI document lists."""

from __future__ import annotations

import io
import re

import httpx
import pytest
import soundfile as sf
from fastapi.routing import iter_route_contexts

from refrain.service.archive import MAX_MANIFEST_BYTES
from refrain.service.settings import Settings

from conftest import CKPT_A, DATA, LiveServer

KEY = {"Authorization": "Bearer k1"}
UPLOADS = ("/v1/tracks", "/v1/search", "/v1/ingest")
SONG = DATA / "audio" / "song75s.flac"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("http-edges") / "data"
    srv = LiveServer(Settings(data_dir=data, model=str(CKPT_A), api_keys="k1", min_free_bytes=0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client):
    return client.get("/openapi.json").json()


def wav(seconds: float, start: float = 10.0) -> bytes:
    x, sr = sf.read(SONG, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, x[int(start * sr) : int((start + seconds) * sr)], sr, format="WAV")
    return buf.getvalue()


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.request.url, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def documented(doc: dict, path: str, method: str, status: int) -> None:
    response = doc["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/ErrorBody"), (path, method, status)


# -- malformed and oversized multipart bodies -----------------------------------------------------


def test_a_malformed_multipart_body_is_a_documented_400(client, doc):
    for path in UPLOADS:
        for body, content_type in (
            (b"--abc\r\n[]--abc--\r\n", "multipart/form-data; boundary=abc"),
            (b"--abc\r\n\r\nx\r\n--abc--\r\n", "multipart/form-data; boundary=abc"),
            (b"whatever", "multipart/form-data"),  # no boundary
        ):
            r = client.post(path, content=body, headers={"Content-Type": content_type})
            assert "multipart/form-data" in error(r, 400, "malformed_multipart")
        documented(doc, path, "post", 400)
    assert client.get("/healthz").status_code == 200


def test_an_oversized_form_field_is_a_413_naming_it(client, doc):
    audio = ("a.wav", wav(6.0))
    big = "x" * (5 << 20)
    bigger = "x" * (MAX_MANIFEST_BYTES + 1)  # ingest takes a manifest as a text field
    for path, files, data, limit in (
        ("/v1/tracks", {"audio": audio}, {"track_id": "big", "title": big}, 1024),
        ("/v1/search", {"audio": audio}, {"reduction": big}, 1024),
        ("/v1/ingest", {"files": audio}, {"replace": bigger}, MAX_MANIFEST_BYTES // 1024),
    ):
        r = client.post(path, files=files, data=data)
        message = error(r, 413, "field_too_large")
        assert re.search(rf"form field '(title|reduction|replace)' is over {limit} KiB", message)
        documented(doc, path, "post", 413)
    # too many parts: 413 too, with its own code
    many = {f"f{i}": "1" for i in range(1001)}
    r = client.post("/v1/search", files={"audio": audio}, data=many)
    assert "more than 1000 form fields" in error(r, 413, "too_many_parts")
    assert client.get("/v1/tracks/big").status_code == 404


# -- content types --------------------------------------------------------------------------------


def test_a_wrong_content_type_is_a_415_on_every_upload_route(client, doc):
    cases = [
        ("/v1/tracks", {"Content-Type": "application/json"}, b'{"track_id": "t"}'),
        ("/v1/tracks", {"Content-Type": "application/x-www-form-urlencoded"}, b"track_id=t"),
        ("/v1/search", {"Content-Type": "text/plain"}, b"top_k=3"),
        ("/v1/search", {}, b""),  # no content type at all
        ("/v1/ingest", {"Content-Type": "text/plain"}, b"x"),
    ]
    for path, headers, body in cases:
        r = client.post(path, content=body, headers=headers)
        assert "expected multipart/form-data" in error(r, 415, "unsupported_media_type")
        documented(doc, path, "post", 415)
    # the key is still checked first
    r = httpx.post(client.base_url.join("/v1/tracks"), json={"track_id": "t"})
    error(r, 401, "unauthorized")


# -- Allow on 405 ---------------------------------------------------------------------------------


def concrete(path_format: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path_format)


def test_every_405_lists_every_method_its_path_accepts(server, client, doc):
    """Over every route of the app: an unaccepted method is a 405 whose `Allow` lists every
    method any route answers at that path, which for a documented path is the document's."""
    by_path: dict[str, set[str]] = {}
    for route in iter_route_contexts(server.app.routes):
        if route.methods:  # mounts (static files) have none
            by_path.setdefault(concrete(route.path_format), set()).update(route.methods)
    documented_paths = {concrete(p): {m.upper() for m in ops} for p, ops in doc["paths"].items()}
    assert set(documented_paths) <= set(by_path)
    assert by_path["/v1/tracks"] == {"GET", "POST"}
    assert by_path["/v1/tracks/x"] == {"GET", "DELETE"}
    checked = 0
    for path, methods in by_path.items():
        if path in documented_paths:
            assert methods == documented_paths[path], path
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - methods:
            r = client.request(method, path)
            error(r, 405, "method_not_allowed")
            allow = {m.strip() for m in r.headers["allow"].split(",")}
            assert allow == methods, (method, path, r.headers["allow"])
            checked += 1
    assert checked >= 4 * len(by_path)


# -- unknown query parameters and form fields -----------------------------------------------------


def test_unknown_query_parameters_are_refused_on_every_route(server, client, doc):
    audio = {"audio": ("q.wav", wav(6.0))}
    r = client.post("/v1/search", params={"top_k": 3}, files=audio)
    message = error(r, 422, "unknown_parameter")
    assert "'top_k'" in message and "form fields go in the body" in message
    r = client.post("/v1/tracks", params={"track_id": "q"}, files=audio)
    error(r, 422, "unknown_parameter")
    assert client.get("/v1/tracks/q").status_code == 404
    r = client.get("/v1/tracks", params={"limit": 1, "lmit": 2})
    assert "'lmit'" in error(r, 422, "unknown_parameter") and "expected: cursor, limit" in r.text
    for path in ("/healthz", "/readyz", "/metrics", "/v1/stats", "/v1/jobs", "/v1/tracks/x"):
        error(client.get(path, params={"verbose": "1"}), 422, "unknown_parameter")
    # the parameters a route declares still work
    assert client.get("/v1/tracks", params={"limit": 1}).status_code == 200
    assert client.get("/v1/jobs", params={"limit": 1, "state": "done"}).status_code == 200
    # the key is checked first
    error(httpx.get(client.base_url.join("/v1/stats?verbose=1")), 401, "unauthorized")
    # every operation documents its 422
    for path, ops in doc["paths"].items():
        for method in ops:
            documented(doc, path, method, 422)


def test_unknown_form_fields_are_refused(client):
    audio = ("q.wav", wav(6.0))
    r = client.post("/v1/search", files={"audio": audio}, data={"topk": "3"})
    message = error(r, 422, "unknown_field")
    assert "'topk'" in message and "top_k" in message
    r = client.post("/v1/tracks", files={"audio": audio}, data={"track_id": "f", "titel": "T"})
    assert "'titel'" in error(r, 422, "unknown_field")
    assert client.get("/v1/tracks/f").status_code == 404
    r = client.post("/v1/ingest", files={"files": audio}, data={"replce": "true"})
    assert "'replce'" in error(r, 422, "unknown_field")


# -- clip lengths ---------------------------------------------------------------------------------


def test_clip_lengths_warn_short_clips_and_match_long_ones_whole(server, client, doc):
    r = client.post(
        "/v1/tracks", files={"audio": ("song.flac", SONG.read_bytes())}, data={"track_id": "song"}
    )
    assert r.status_code in (200, 201), r.text
    short = client.post("/v1/search", files={"audio": ("q.wav", wav(3.0))})
    assert short.status_code == 200, short.text
    (warning,) = short.json()["warnings"]
    assert warning["code"] == "short_clip" and "3.0 s" in warning["message"]
    fine = client.post("/v1/search", files={"audio": ("q.wav", wav(8.0))})
    assert fine.status_code == 200 and fine.json()["warnings"] == []
    # 75 s: past the 60 s once promised, under REFRAIN_MAX_QUERY_S (120 s): matched whole
    whole = client.post("/v1/search", files={"audio": ("q.flac", SONG.read_bytes())})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["warnings"] == [] and body["query_duration_s"] == pytest.approx(75.0, abs=0.01)
    top = body["results"][0]
    assert top["track_id"] == "song"
    assert max(m["query_end_s"] for m in top["matches"]) > 60
    # the limit is REFRAIN_MAX_QUERY_S: over it, a refusal, not a cut
    server.app.state.settings.max_query_s = 60.0
    try:
        r = client.post("/v1/search", files={"audio": ("q.flac", SONG.read_bytes())})
        error(r, 422, "audio_too_long")
    finally:
        server.app.state.settings.max_query_s = 120.0
    schema = doc["components"]["schemas"]
    assert "warnings" in schema["SearchResponse"]["properties"]
    assert set(schema["WarningDetail"]["properties"]) == {"code", "message"}
