"""Bulk ingestion against a live uvicorn server: uploads, archives, folders, jobs, CLIs."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sqlite3
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from refrain.service import ingest_commands
from refrain.service.archive import ArchiveLimits, extract_archive
from refrain.service.catalog_files import read_catalog
from refrain.service.errors import RefrainError, TooLarge
from refrain.service.settings import Settings

from conftest import CKPT_A, DATA, LiveServer

KEY = {"Authorization": "Bearer k1"}
FORMATS = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG"}
_song: tuple[np.ndarray, int] | None = None
_offsets = itertools.count()


def clip(path: Path, seconds: float = 6.0) -> Path:
    """A short audio file of distinct content: a cut of the test song at a fresh offset."""
    global _song
    if _song is None:
        _song = sf.read(DATA / "audio" / "song75s.flac", dtype="float32")
    x, sr = _song
    n = next(_offsets)
    start = int((n * 2.5) % 60 * sr)
    gain = 0.5 + 0.05 * (n // 24)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(
        path, x[start : start + int(seconds * sr)] * gain, sr, format=FORMATS[path.suffix.lower()]
    )
    return path


def settings(data: Path, **kw) -> Settings:
    base = {"data_dir": data, "model": str(CKPT_A), "open_writes": False, "api_keys": "k1"}
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ingest")


@pytest.fixture(scope="module")
def server(root):
    srv = LiveServer(
        settings(root / "data", import_root=root / "imports", max_archive_bytes=50 << 20)
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=KEY) as c:
        yield c


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60.0, **params) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", params=params).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish: {job}")


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def n_tracks(client: httpx.Client) -> int:
    return client.get("/v1/stats").json()["index"]["tracks"]


def jobs_leftovers(root: Path, wait_s: float = 5.0) -> list[str]:
    """The job folders left in the service's data folder. A job's folder goes just after its
    final state is written (what `wait_job` sees first), so give it `wait_s` to go."""
    deadline = time.monotonic() + wait_s
    while True:
        left = sorted(p.name for p in (root / "data" / "jobs").iterdir() if p.is_dir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- auth and errors ------------------------------------------------------------------------------


def test_ingest_requires_a_valid_key(server, tmp_path):
    files = upload([clip(tmp_path / "x.wav")])
    with server.client() as anon:
        r = anon.post("/v1/ingest", files=files)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = anon.post("/v1/ingest", files=files, headers={"X-API-Key": "nope"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = anon.get("/v1/jobs/" + "0" * 32)  # reading a job needs the key too
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = anon.get("/v1/jobs/" + "0" * 32, headers=KEY)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_bad_requests_are_refused_before_a_job_exists(client, root, tmp_path):
    a, b = clip(tmp_path / "a.wav"), clip(tmp_path / "b.flac")
    cases = [
        ({"manifest": "filename,track_id\na.wav,r1\nghost.wav,r2\n"}, "manifest_files_missing"),
        ({"manifest": "filename,track_id\na.wav,same\nb.flac,same\n"}, "duplicate_track_id"),
        ({"manifest": "filename,trackid\na.wav,x\n"}, "invalid_manifest"),
        ({"manifest": '[{"filename": "a.wav", "track_id": "bad/../id?"}]'}, "invalid_track_id"),
    ]
    for data, code in cases:
        r = client.post("/v1/ingest", files=upload([a, b]), data=data)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code
    assert "ghost.wav" in client.post("/v1/ingest", files=upload([a]), data=cases[0][0]).text
    r = client.post("/v1/ingest", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/ingest", files={"archive": ("a.zip", a.read_bytes())})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_archive"
    r = client.post("/v1/ingest", files=[*upload([a]), ("archive", ("a.zip", b"PK"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert jobs_leftovers(root) == []


# -- uploaded files -------------------------------------------------------------------------------


def test_files_with_manifest_then_same_catalog_adds_nothing(client, tmp_path):
    paths = [clip(tmp_path / f"song{i}{ext}") for i, ext in enumerate(FORMATS)]
    manifest = (
        "filename,track_id,title,artist,work_id\n"
        "song0.wav,m-0,First,Ann,W1\nsong2.mp3,m-2,Third,,W1\n"
    )
    before = n_tracks(client)
    r = client.post("/v1/ingest", files=upload(paths), data={"manifest": manifest})
    assert r.status_code == 202, r.text
    assert r.json()["total"] == 4 and r.headers["location"] == f"/v1/jobs/{r.json()['job_id']}"
    job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "done" and job["progress"] == 1.0
    assert job["counts"] == {"total": 4, "pending": 0, "done": 4, "failed": 0, "skipped": 0}
    assert n_tracks(client) == before + 4
    t = client.get("/v1/tracks/m-0").json()
    assert (t["title"], t["artist"], t["work_id"]) == ("First", "Ann", "W1")
    assert t["content_sha256"] and t["n_segments"] >= 1
    assert client.get("/v1/tracks/song1").json()["title"] == "song1"  # default: file name
    assert client.get("/v1/tracks/song3").status_code == 200

    again = client.post("/v1/ingest", files=upload(paths), data={"manifest": manifest})
    job = wait_job(client, again.json()["job_id"])
    assert job["counts"]["skipped"] == 4 and job["counts"]["done"] == 0
    assert n_tracks(client) == before + 4


def test_corrupt_file_fails_alone(client, root, tmp_path):
    good = [clip(tmp_path / "ok1.wav"), clip(tmp_path / "ok2.flac")]
    files = [*upload(good), ("files", ("broken.mp3", b"ID3" + bytes(400), "audio/mpeg"))]
    job = wait_job(client, client.post("/v1/ingest", files=files).json()["job_id"])
    assert job["state"] == "done"
    assert job["counts"]["done"] == 2 and job["counts"]["failed"] == 1
    (err,) = job["errors"]
    assert err["filename"] == "broken.mp3" and err["track_id"] == "broken"
    assert err["code"] in ("bad_audio", "unsupported_audio") and err["message"]
    assert jobs_leftovers(root) == []  # stored files are removed once the job is final


def test_other_content_under_a_stored_id_fails_unless_replace(client, tmp_path):
    first, second = clip(tmp_path / "v1" / "rep.wav"), clip(tmp_path / "v2" / "rep.wav")
    job = wait_job(client, client.post("/v1/ingest", files=upload([first])).json()["job_id"])
    assert job["counts"]["done"] == 1
    job = wait_job(client, client.post("/v1/ingest", files=upload([second])).json()["job_id"])
    assert [e["code"] for e in job["errors"]] == ["track_exists"]
    r = client.post("/v1/ingest", files=upload([second]), data={"replace": "true"})
    job = wait_job(client, r.json()["job_id"], items="true")
    assert job["items"][0]["result"] == "replaced" and job["counts"]["done"] == 1


# -- archives -------------------------------------------------------------------------------------


def test_zip_and_targz_with_manifest_inside(client, tmp_path):
    a, b = clip(tmp_path / "z" / "a.wav"), clip(tmp_path / "z" / "sub" / "b.ogg")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(a, "a.wav")
        zf.write(b, "sub/b.ogg")
        zf.writestr("notes.txt", "not audio")
        zf.writestr(
            "manifest.json",
            json.dumps(
                [
                    {"filename": "sub/b.ogg", "track_id": "zip-b", "title": "Bee", "work_id": "W9"},
                ]
            ),
        )
    r = client.post("/v1/ingest", files={"archive": ("cat.zip", buf.getvalue())})
    assert r.status_code == 202, r.text
    assert r.json()["ignored"] == 1
    job = wait_job(client, r.json()["job_id"])
    assert job["counts"]["done"] == 2 and job["ignored"] == 1
    assert client.get("/v1/tracks/zip-b").json()["title"] == "Bee"
    assert client.get("/v1/tracks/a").status_code == 200  # member path without extension

    c, d = clip(tmp_path / "t" / "c.flac"), clip(tmp_path / "t" / "d.mp3")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(c, "./c.flac")
        tf.add(d, "./d.mp3")
        man = b"filename,track_id,title,artist,work_id\nc.flac,tar-c,Cee,Dee,W2\nd.mp3,tar-d,,,\n"
        info = tarfile.TarInfo("manifest.csv")
        info.size = len(man)
        tf.addfile(info, io.BytesIO(man))
    r = client.post("/v1/ingest", files={"archive": ("cat.tar.gz", buf.getvalue())})
    job = wait_job(client, r.json()["job_id"])
    assert job["counts"]["done"] == 2, job
    assert client.get("/v1/tracks/tar-c").json()["artist"] == "Dee"
    assert client.get("/v1/tracks/tar-d").json()["title"] == "d"


def test_zip_with_traversal_is_refused(client, root, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fine.wav", clip(tmp_path / "fine.wav").read_bytes())
        zf.writestr("../evil.wav", b"RIFF")
    r = client.post("/v1/ingest", files={"archive": ("x.zip", buf.getvalue())})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "unsafe_archive"
    assert "../evil.wav" in r.json()["error"]["message"]
    assert not list(root.rglob("evil.wav")) and jobs_leftovers(root) == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "absolute"])
def test_tar_with_links_or_absolute_paths_is_refused(client, root, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("ok.wav")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"RIFF"))
        bad = tarfile.TarInfo("/etc/x.wav" if kind == "absolute" else "link.wav")
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "ok.wav"
        tf.addfile(bad, io.BytesIO(b"") if kind != "absolute" else None)
    r = client.post("/v1/ingest", files={"archive": ("x.tar", buf.getvalue())})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_archive", r.text
    assert jobs_leftovers(root) == []


def test_decompression_bombs_are_refused(client, root):
    zeros = bytes(1 << 20)
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("bomb.wav", "w", force_zip64=True) as f,
    ):
        for _ in range(200):  # 200 MB of zeros, ~200 kB compressed
            f.write(zeros)
    assert len(buf.getvalue()) < 2 << 20
    r = client.post("/v1/ingest", files={"archive": ("bomb.zip", buf.getvalue())})
    assert r.status_code in (413, 422), r.text
    assert r.json()["error"]["code"] in ("archive_too_large", "unsafe_archive")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("big.wav")
        info.size = 60 << 20  # over the 50 MB limit of this server
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    r = client.post("/v1/ingest", files={"archive": ("bomb.tgz", buf.getvalue())})
    assert r.status_code == 413 and r.json()["error"]["code"] == "archive_too_large"
    assert jobs_leftovers(root) == []
    assert sum(f.stat().st_size for f in (root / "data").rglob("*") if f.is_file()) < 40 << 20


def _zip(members: dict[str, bytes], symlink: str | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    buf.seek(0)
    return buf


def test_extract_archive_rules(tmp_path):
    limits = ArchiveLimits(max_files=5, max_bytes=1 << 20)
    out = extract_archive(
        _zip(
            {
                "a.WAV": b"1",
                "dir/b.flac": b"22",
                "__MACOSX/._a.WAV": b"x",
                "dir/manifest.csv": b"",
                "manifest.csv": b"filename\n",
            }
        ),
        tmp_path,
        limits,
    )
    assert [(n, p.name) for n, p in out.files] == [
        ("a.WAV", "000000.wav"),
        ("dir/b.flac", "000001.flac"),
    ]
    assert out.manifest == ("manifest.csv", b"filename\n") and out.ignored == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.wav", "000001.flac"]
    with pytest.raises(RefrainError) as e:
        extract_archive(_zip({"a.wav": b""}, symlink="link.wav"), tmp_path / "x", limits)
    assert e.value.code == "unsafe_archive" and "link.wav" in e.value.message
    with pytest.raises(RefrainError) as e:
        extract_archive(_zip({f"{i}.wav": b"" for i in range(6)}), tmp_path / "x", limits)
    assert isinstance(e.value, TooLarge)
    with pytest.raises(RefrainError) as e:
        extract_archive(_zip({"C:\\x.wav": b""}), tmp_path / "x", limits)
    assert e.value.code == "unsafe_archive"


# -- folders under the import root ----------------------------------------------------------------


def test_path_ingestion_inside_the_root_only(client, root, tmp_path):
    cat = root / "imports" / "cat"
    clip(cat / "p1.wav")
    clip(cat / "deep" / "p2.flac")
    (cat / "cover.jpg").write_bytes(b"\xff\xd8")
    (cat / "manifest.csv").write_text("filename,track_id,title\ndeep/p2.flac,path-2,Two\n")
    r = client.post("/v1/ingest", json={"path": "cat"})
    assert r.status_code == 202, r.text
    assert r.json()["ignored"] == 1
    job = wait_job(client, r.json()["job_id"], items="true")
    assert job["counts"]["done"] == 2
    assert {i["track_id"] for i in job["items"]} == {"p1", "path-2"}
    assert client.get("/v1/tracks/path-2").json()["title"] == "Two"
    assert (cat / "p1.wav").exists()  # files under the root are read, never moved or deleted

    outside = tmp_path / "secret"
    clip(outside / "s.wav")
    (root / "imports" / "escape").symlink_to(outside)
    for body in (
        {"path": "../"},
        {"path": str(outside)},
        {"path": "escape"},
        {"path": "cat", "manifest": "../../x.csv"},
    ):
        r = client.post("/v1/ingest", json=body)
        assert r.status_code == 403, (body, r.text)
        assert r.json()["error"]["code"] == "path_forbidden"
    r = client.post("/v1/ingest", json={"path": "cat", "extra": 1})
    assert r.status_code == 422


# -- persistence ----------------------------------------------------------------------------------


def test_job_survives_a_restart(tmp_path):
    data = tmp_path / "data"
    paths = [clip(tmp_path / "in" / f"r{i}.wav") for i in range(5)]
    first = LiveServer(settings(data))
    engine = first.app.state.runtime.engine
    real = engine.add_reference

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    engine.add_reference = slow
    with first.client(headers=KEY) as c:
        job_id = c.post("/v1/ingest", files=upload(paths)).json()["job_id"]
        deadline = time.monotonic() + 60
        while (job := c.get(f"/v1/jobs/{job_id}").json())["counts"]["done"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["state"] == "running" and job["started"] >= job["created"]
        assert 0 < job["progress"] < 1 and job["eta_s"] > 0
    first.stop()
    with sqlite3.connect(data / "jobs" / "jobs.sqlite") as db:
        (pending,) = db.execute("SELECT count(*) FROM items WHERE state = 'pending'").fetchone()
    assert pending >= 1

    second = LiveServer(settings(data))
    try:
        with second.client(headers=KEY) as c:
            job = wait_job(c, job_id)
            assert job["state"] == "done" and job["counts"]["failed"] == 0
            assert job["counts"]["done"] + job["counts"]["skipped"] == 5
            for p in paths:
                assert c.get(f"/v1/tracks/{p.stem}").status_code == 200
            r = c.post("/v1/ingest", json={"path": "x"})  # no import root configured
            assert r.status_code == 403 and "REFRAIN_IMPORT_ROOT" in r.json()["error"]["message"]
    finally:
        second.stop()


# -- command line ---------------------------------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="refrain")
    ingest_commands.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_index_build_then_service_opens_it(tmp_path, root):
    cat = root / "imports" / "built"
    for name in ("b1.wav", "b2.flac", "sub/b3.mp3"):
        clip(cat / name)
    data = tmp_path / "data"
    assert cli("index", "build", str(cat), "--data", str(data), "--checkpoint", str(CKPT_A)) == 0
    assert cli("index", "build", str(cat), "--data", str(data), "--checkpoint", str(CKPT_A)) == 0
    srv = LiveServer(settings(data, import_root=root / "imports"))
    try:
        with srv.client(headers=KEY) as c:
            assert n_tracks(c) == 3
            assert c.get("/v1/tracks/b1").json()["duration_s"] == pytest.approx(6.0, abs=0.01)
            job = wait_job(c, c.post("/v1/ingest", json={"path": "built"}).json()["job_id"])
            assert job["counts"]["skipped"] == 3  # same ids and content as the service's own
            assert n_tracks(c) == 3
    finally:
        srv.stop()
    # built offline with the chroma sequences the service stores: verification works on it
    from refrain.index import open_index
    from refrain.model.sequence import SEQUENCE_RATE, decode

    info = json.loads((data / "index" / "index.json").read_text())
    with open_index(data / "index", info["identity"], create=False) as ix:
        ids = [t.track_id for t in ix.list_tracks(10)[0]]
        stored = ix.sequences(ids)
    assert len(ids) == 3 and set(stored) == set(ids)
    assert len(decode(stored["b1"])) == pytest.approx(6.0 * SEQUENCE_RATE, abs=1)


def test_ingest_commands_uploads_and_resumes(server, client, tmp_path, capsys, monkeypatch):
    from refrain.service.ingest_client import LEGACY_STATE_FILE, default_state_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cat = tmp_path / "catalog"
    for name in ("c1.wav", "c2.ogg", "nested/c3.flac"):
        clip(cat / name)
    (cat / "list.csv").write_text(
        "path,track_id,title,artist,work_id\n"
        "c1.wav,cli-1,One,Band,W7\nc2.ogg,cli-2,,,\n"
        "nested/c3.flac,,,,\n"
    )
    catalog_files = sorted(cat.rglob("*"))
    before = n_tracks(client)
    argv = (
        "ingest",
        str(cat / "list.csv"),
        "--url",
        server.url,
        "--api-key",
        "k1",
        "--batch",
        "2",
        "--poll",
        "0.1",
    )
    assert cli(*argv) == 0
    out = capsys.readouterr().out
    assert "added 3" in out
    assert n_tracks(client) == before + 3
    assert client.get("/v1/tracks/cli-1").json()["work_id"] == "W7"
    # the resumption state is the user's: nothing is left in the catalog folder
    assert sorted(cat.rglob("*")) == catalog_files
    state_file = default_state_path(cat / "list.csv")
    assert state_file.parent == tmp_path / "state" / "refrain" / "ingest"
    state = json.loads(state_file.read_text())
    assert len(state["servers"][server.url]["batches"]) == 2

    assert cli(*argv) == 0  # everything finished: nothing is sent again
    assert "3 files were ingested by an earlier run" in capsys.readouterr().out
    assert n_tracks(client) == before + 3

    # a state file an older version left in the catalog folder is read, then moved
    state_file.rename(cat / LEGACY_STATE_FILE)
    assert cli(*argv) == 0
    captured = capsys.readouterr()
    assert "3 files were ingested by an earlier run" in captured.out
    assert f"resumption state moved to {state_file}" in captured.err
    assert sorted(cat.rglob("*")) == catalog_files and state_file.is_file()
    assert n_tracks(client) == before + 3


def test_ingest_commands_without_key_fails_cleanly(server, tmp_path, monkeypatch):
    monkeypatch.delenv("REFRAIN_API_KEY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    clip(tmp_path / "k" / "k1.wav")
    with pytest.raises(PermissionError, match="API key"):
        cli("ingest", str(tmp_path / "k"), "--url", server.url, "--retries", "0")


def test_ingest_commands_retries_connection_errors_and_503(tmp_path, monkeypatch):
    from refrain.service import ingest_client

    clip(tmp_path / "r" / "r1.wav")
    entries = read_catalog(tmp_path / "r")
    calls, waits = [], []
    replies = iter(
        [
            httpx.ConnectError("refused"),
            httpx.Response(503, headers={"Retry-After": "7"}, json={"error": {}}),
            httpx.Response(202, json={"job_id": "j1", "state": "queued", "total": 1}),
            httpx.Response(
                200,
                json={
                    "job_id": "j1",
                    "state": "done",
                    "errors": [],
                    "counts": {"total": 1, "pending": 0, "done": 1, "failed": 0, "skipped": 0},
                },
            ),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(ingest_client.time, "sleep", waits.append)
    with ingest_client.Uploader("http://svc", "k1", tmp_path / "state.json", 5, 0.1) as up:
        up.client.close()
        up.client = httpx.Client(base_url="http://svc", transport=httpx.MockTransport(handler))
        summary = up.run([entries], total=1)
    assert calls == [("POST", "/v1/ingest")] * 3 + [("GET", "/v1/jobs/j1")]
    assert waits == [0.5, 7.0]  # backoff, then the server's Retry-After
    assert summary.added == 1 and summary.failed == 0
