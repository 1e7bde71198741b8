"""Defects an outside fault, fuzz and abuse run found, against a live uvicorn server: hostile
audio, full disks, keys on reads, malformed form fields and paths."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import soundfile as sf
from test_ingest import clip, wait_job
from test_storage import tgz_of, zip_of

from refrain.model.audio import AudioDecodeError, load_audio
from refrain.service import storage
from refrain.service.archive import ArchiveLimits, extract_archive
from refrain.service.errors import RefrainError, TooLarge
from refrain.service.settings import Settings

from conftest import CKPT_A, DATA, LiveServer

KEY = {"Authorization": "Bearer k1"}


def settings(data, **kw) -> Settings:
    base = {"data_dir": data, "model": str(CKPT_A), "api_keys": "k1", "min_free_bytes": 0}
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "imports" / "catalog").mkdir(parents=True)
    srv = LiveServer(settings(root / "data", import_root=root / "imports"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=KEY) as c:
        yield c


def float_wav(peak: float, seconds: float = 8.0, sr: int = 16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(
        buf,
        (np.sin(2 * np.pi * 440 * t) * peak).astype(np.float32),
        sr,
        format="WAV",
        subtype="FLOAT",
    )
    return buf.getvalue()


# -- huge finite samples --------------------------------------------------------------------------


def test_huge_finite_samples_are_bad_audio_everywhere(client, tmp_path):
    huge = float_wav(1e20)
    with pytest.raises(AudioDecodeError, match="peak"):
        load_audio(huge)
    assert np.abs(load_audio(float_wav(4.0))).max() == pytest.approx(4.0, rel=1e-3)  # kept

    r = client.post("/v1/search", files={"audio": ("huge.wav", huge)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_audio", r.text
    r = client.post("/v1/tracks", files={"audio": ("huge.wav", huge)}, data={"track_id": "huge"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_audio", r.text
    r = client.post(
        "/v1/ingest",
        files=[
            ("files", ("huge.wav", huge)),
            ("files", ("ok.wav", clip(tmp_path / "ok.wav").read_bytes())),
        ],
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["counts"]["failed"] == 1 and job["counts"]["done"] == 1, job
    assert job["errors"][0]["code"] == "bad_audio"
    assert client.get("/v1/tracks/huge").status_code == 404


# -- a full disk ----------------------------------------------------------------------------------


def dc_flac(seconds: float, sr: int = 8000) -> bytes:
    """A constant offset: not silent, and FLAC stores 600 s of it in about 14 kB."""
    buf = io.BytesIO()
    sf.write(buf, np.full(int(seconds * sr), 0.01, np.float32), sr, format="FLAC")
    return buf.getvalue()


def test_a_full_disk_answers_507_and_writes_resume_once_space_is_back(small_disk, monkeypatch):
    server = LiveServer(settings(small_disk.path / "data"))
    try:
        with server.client(headers=KEY) as c:
            long = dc_flac(600)  # 117 segments: a journal record of 61 kB
            assert len(long) < 20_000
            small_disk.fill(leave=40_000)  # room for the upload, not for its index write
            r = c.post(
                "/v1/tracks", files={"audio": ("long.flac", long)}, data={"track_id": "long"}
            )
            assert r.status_code == 507, r.text
            assert r.json()["error"]["code"] == "insufficient_storage"
            assert "index write of 117 segments" in r.json()["error"]["message"]
            assert c.get("/readyz").status_code == 200

            # a guard that cannot see the disk fill up: the journal itself meets ENOSPC
            monkeypatch.setattr(storage, "free_bytes", lambda path: 1 << 40)
            small_disk.fill()
            short = dc_flac(80)  # 13 segments, 7 kB: more than the journal's last page holds
            for _ in range(2):
                r = c.post(
                    "/v1/tracks", files={"audio": ("short.flac", short)}, data={"track_id": "short"}
                )
                assert r.status_code == 507, r.text
                assert r.json()["error"]["code"] == "insufficient_storage"
            assert c.get("/readyz").status_code == 200
            assert c.get("/v1/tracks/short").status_code == 404

            small_disk.free()  # space is back: writes work again, no restart
            monkeypatch.undo()
            r = c.post(
                "/v1/tracks", files={"audio": ("short.flac", short)}, data={"track_id": "short"}
            )
            assert r.status_code == 201, r.text
            assert c.get("/readyz").json() == {"status": "ready"}
            assert c.get("/v1/tracks/short").json()["n_segments"] == 13
    finally:
        server.stop()
    server = LiveServer(settings(small_disk.path / "data"))  # and it is all there after a restart
    try:
        with server.client(headers=KEY) as c:
            assert [t["track_id"] for t in c.get("/v1/tracks").json()["tracks"]] == ["short"]
    finally:
        server.stop()


# -- decompression bombs --------------------------------------------------------------------------


def tgz_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("ok.wav")
        info.size = 1000
        tf.addfile(info, io.BytesIO(os.urandom(1000)))
        info = tarfile.TarInfo("big.wav")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


def zip_bomb(members: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in range(members):  # each exactly 1 MiB, the old per-member floor
            zf.writestr(f"z{n:04d}.wav", bytes(1 << 20))
    return buf.getvalue()


@pytest.mark.parametrize(
    "bomb",
    [lambda: tgz_bomb(64 << 20), lambda: zip_bomb(128)],
    ids=["tgz-one-member", "zip-many-members"],
)
def test_decompression_bombs_are_refused_before_anything_is_written(tmp_path, bomb):
    data = bomb()
    assert len(data) < 1 << 20
    limits = ArchiveLimits(max_files=10_000, max_bytes=8 << 30, max_file_bytes=200 << 20)
    with pytest.raises(RefrainError) as e:
        extract_archive(io.BytesIO(data), tmp_path, limits)
    assert e.value.code == "unsafe_archive" and "decompression bomb" in e.value.message
    assert list(tmp_path.iterdir()) == []


def test_archive_bombs_via_the_service_leave_nothing(client, server):
    data_dir = server.app.state.settings.data_dir
    for name, data in (("bomb.tgz", tgz_bomb(64 << 20)), ("bomb.zip", zip_bomb(128))):
        r = client.post("/v1/ingest", files={"archive": (name, data)})
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_archive", r.text
    assert sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) < 4 << 20


def test_the_per_file_limit_applies_before_writing(tmp_path):
    member = os.urandom(5000)
    for pack in (lambda: zip_of({"a.wav": member}), lambda: tgz_of({"a.wav": member})):
        with pytest.raises(RefrainError) as e:
            extract_archive(io.BytesIO(pack()), tmp_path, ArchiveLimits(10, 1 << 20, 4000))
        assert isinstance(e.value, TooLarge) and e.value.code == "file_too_large"
        assert "'a.wav' has 5000 bytes" in e.value.message
        assert list(tmp_path.iterdir()) == []


# -- malformed fields and paths -------------------------------------------------------------------


def test_a_nul_in_an_ingest_path_is_refused(client):
    for body in ({"path": "catalog\u0000x"}, {"path": "catalog", "manifest": "m\u0000.csv"}):
        r = client.post(
            "/v1/ingest", content=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_path", r.text


def test_metadata_has_length_limits(client, tmp_path):
    audio = clip(tmp_path / "m.wav").read_bytes()
    for field, n in (("title", 501), ("artist", 501), ("work_id", 201)):
        r = client.post(
            "/v1/tracks",
            files={"audio": ("m.wav", audio)},
            data={"track_id": "meta", field: "x" * n},
        )
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_metadata" and f"{field} must be at most" in err["message"]
    manifest = json.dumps([{"filename": "m.wav", "track_id": "meta", "title": "y" * 900_000}])
    r = client.post(
        "/v1/ingest",
        files=[("files", ("m.wav", audio)), ("manifest", ("manifest.json", manifest.encode()))],
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_metadata", r.text
    assert client.get("/v1/tracks/meta").status_code == 404
    r = client.post(
        "/v1/tracks",
        files={"audio": ("m.wav", audio)},
        data={"track_id": "meta", "title": "t" * 500},
    )
    assert r.status_code == 201 and r.json()["title"] == "t" * 500


def test_form_fields_that_are_not_utf8_are_refused(client, tmp_path):
    audio = clip(tmp_path / "u.wav").read_bytes()
    bad = b"\xff\xfe\xc3(bad"  # Starlette alone would store it as Latin-1: "ÿþÃ(bad"
    for route, files, data in (
        ("/v1/tracks", {"audio": ("u.wav", audio)}, {"track_id": bad}),
        ("/v1/tracks", {"audio": ("u.wav", audio)}, {"track_id": "utf8", "title": bad}),
        ("/v1/search", {"audio": ("u.wav", audio)}, {"k": b"\xff5"}),
        ("/v1/ingest", [("files", ("u.wav", audio))], {"manifest": b"filename,track_id\n" + bad}),
    ):
        r = client.post(route, files=files, data=data)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and "is not valid utf-8 text" in err["message"]
    assert client.get("/v1/tracks/utf8").status_code == 404
    # real UTF-8 is stored as sent
    title = "Café, Ünïcödé ♪ 音楽"
    r = client.post(
        "/v1/tracks",
        files={"audio": ("u.wav", audio)},
        data={"track_id": "utf8", "title": title.encode()},
    )
    assert r.status_code == 201 and r.json()["title"] == title, r.text
    assert client.get("/v1/tracks/utf8").json()["title"] == title
    assert client.delete("/v1/tracks/utf8").status_code == 200


def test_a_manifest_linking_outside_the_import_root_is_not_read(client, server, tmp_path):
    root = server.app.state.settings.import_root
    folder = root / "linked"
    folder.mkdir()
    clip(folder / "song.wav")
    secret = tmp_path / "secret.csv"
    secret.write_text("filename,password\nsong.wav,hunter2\n")
    (folder / "manifest.csv").symlink_to(secret)
    r = client.post(
        "/v1/ingest",
        content=json.dumps({"path": "linked"}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 202, r.text  # the manifest is ignored, not read
    assert "hunter2" not in r.text and "password" not in r.text
    job = wait_job(client, r.json()["job_id"], items="true")
    assert job["ignored"] == 1 and job["items"][0]["track_id"] == "song"


def test_an_over_limit_chunked_body_is_a_413(live_server, tmp_path):
    srv = live_server(settings(tmp_path / "data", max_upload_bytes=1 << 20))
    head = (
        b'--B\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
    )

    def body():  # no Content-Length: the limit is only seen while streaming
        yield head
        for _ in range(3):
            yield bytes(1 << 20)
        yield b"\r\n--B--\r\n"

    with srv.client(headers=KEY) as c:
        for route in ("/v1/search", "/v1/tracks"):
            r = c.post(
                route, content=body(), headers={"Content-Type": "multipart/form-data; boundary=B"}
            )
            assert r.status_code == 413, (route, r.text)
            assert r.json()["error"]["code"] == "payload_too_large"


def test_a_corrupt_job_database_is_set_aside_and_ingestion_goes_on(live_server, tmp_path):
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    (data / "jobs" / "jobs.sqlite").write_bytes(b"this is not a database" * 512)
    srv = live_server(settings(data))
    with srv.client(headers=KEY) as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        r = c.post(
            "/v1/tracks",
            files={"audio": ("a.wav", clip(tmp_path / "a.wav").read_bytes())},
            data={"track_id": "a"},
        )
        assert r.status_code == 201, r.text
        assert c.get("/v1/jobs/" + "0" * 32).status_code == 404
        r = c.post("/v1/ingest", files={"files": ("b.wav", clip(tmp_path / "b.wav").read_bytes())})
        assert r.status_code == 202, r.text
        assert wait_job(c, r.json()["job_id"])["state"] == "done"
    # the file is kept for the operator, under a new name
    (aside,) = (data / "jobs").glob("corrupt-*/jobs.sqlite")
    assert aside.read_bytes().startswith(b"this is not")


def test_a_truncated_reference_is_refused_and_a_truncated_clip_still_searches(client, tmp_path):
    x, sr = sf.read(DATA / "audio" / "song75s.flac", dtype="float32", frames=30 * 44100)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC")
    whole = buf.getvalue()
    cut = whole[: len(whole) // 10]  # an upload cut off at 10 %: the header still says 30 s
    r = client.post("/v1/tracks", files={"audio": ("cut.flac", cut)}, data={"track_id": "cut"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "truncated_audio" and "30.00 s its header declares" in err["message"]
    assert client.get("/v1/tracks/cut").status_code == 404
    # the whole file is stored; a truncated query clip is searched with what it holds
    r = client.post(
        "/v1/tracks", files={"audio": ("whole.flac", whole)}, data={"track_id": "whole"}
    )
    assert r.status_code == 201, r.text
    found = client.post("/v1/search", files={"audio": ("q.flac", whole[: len(whole) // 3])})
    assert found.status_code == 200 and found.json()["query_duration_s"] < 15


def test_unauthenticated_uploads_are_refused_before_their_body_is_read(tmp_path):
    import asyncio

    from refrain.service.app import create_app

    app = create_app(settings(tmp_path / "data"))  # keys set: writes and reads need one

    async def post(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        chunks = 0

        async def receive():
            nonlocal chunks
            chunks += 1
            return {"type": "http.request", "body": b"x" * 65536, "more_body": chunks < 64}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"multipart/form-data; boundary=B"), *headers],
        }
        await app(scope, receive, send)
        return sent[0]["status"], chunks

    for path in ("/v1/tracks", "/v1/search"):
        assert asyncio.run(post(path, [])) == (401, 0)
        assert asyncio.run(post(path, [(b"x-api-key", b"wrong")])) == (403, 0)
        status, chunks = asyncio.run(post(path, [(b"authorization", b"Bearer k1")]))
        assert status != 401 and chunks > 0  # with the key the body is read (then 503: loading)


def test_a_file_swapped_for_an_outside_link_after_the_job_was_accepted_is_not_read(tmp_path):
    from refrain.service.engine import Engine
    from refrain.service.errors import Forbidden
    from refrain.service.metrics import Metrics
    from refrain.service.sources import Item

    root = tmp_path / "imports"
    (root / "catalog").mkdir(parents=True)
    secret = tmp_path / "outside.wav"
    secret.write_bytes(b"RIFF-secret" * 100)
    inside = root / "catalog" / "a.wav"
    inside.write_bytes(b"RIFF-audio" * 100)
    engine = Engine(settings(tmp_path / "data", import_root=root), None, None, None, Metrics())
    item = Item("a.wav", inside, False, "a", "", "", None)
    assert engine.read_item(item).startswith(b"RIFF-audio")
    inside.unlink()
    inside.symlink_to(secret)  # swapped after the check that accepted the job
    with pytest.raises(Forbidden) as e:
        engine.read_item(item)
    assert e.value.code == "path_forbidden" and "outside the import root" in e.value.message
    inside.unlink()  # a link within the root is still read
    (root / "catalog" / "b.wav").write_bytes(b"RIFF-b" * 100)
    inside.symlink_to(root / "catalog" / "b.wav")
    assert engine.read_item(item).startswith(b"RIFF-b")
    inside.unlink()  # a folder above it swapped for a link to elsewhere
    (root / "catalog" / "b.wav").unlink()
    (root / "catalog").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.wav").write_bytes(b"RIFF-other" * 100)
    (root / "catalog").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Forbidden, match="outside the import root"):
        engine.read_item(item)
