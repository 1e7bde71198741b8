"""The free-disk guard: uploads, archives and tracks that would leave less than
`min_free_bytes` free on the data volume are refused with 507 before anything is written."""

from __future__ import annotations

import io
import shutil
import sqlite3
import tarfile
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from refrain.service import storage
from refrain.service.archive import ArchiveLimits, extract_archive
from refrain.service.errors import InsufficientStorage, RefrainError
from refrain.service.settings import Settings
from refrain.service.sources import Item

from conftest import CKPT_A, DATA, LiveServer

KEY = {"Authorization": "Bearer k1"}
MIN_FREE = 1 << 30
QUIET = bytes(1 << 20)  # an audio-named member that deflates to almost nothing


def wav(seconds: float, offset: float) -> bytes:
    x, sr = sf.read(
        DATA / "audio" / "song75s.flac",
        dtype="float32",
        start=int(offset * 44100),
        frames=int(seconds * 44100),
    )
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV")
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tgz_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def disk(monkeypatch):
    """Set `disk.free` to the bytes the service should see as free; None: the real figure."""
    state = type("Disk", (), {"free": None})()
    real = storage.free_bytes
    monkeypatch.setattr(
        storage, "free_bytes", lambda path: real(path) if state.free is None else state.free
    )
    return state


def spool(data: Path) -> list[str]:
    """Every file and folder under the jobs folder but the job database."""
    return sorted(
        str(p.relative_to(data))
        for p in (data / "jobs").rglob("*")
        if not p.name.startswith("jobs.sqlite")
    )


def n_jobs(data: Path) -> int:
    with sqlite3.connect(data / "jobs" / "jobs.sqlite") as db:
        return db.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_uploads_archives_and_tracks_are_refused_when_the_disk_is_nearly_full(tmp_path, disk):
    data = tmp_path / "data"
    server = LiveServer(
        Settings(data_dir=data, model=str(CKPT_A), api_keys="k1", min_free_bytes=MIN_FREE)
    )
    a, b = wav(6, 0), wav(6, 10)
    archive_members = {"a.wav": a, "quiet.wav": QUIET, "notes.txt": b"not audio"}
    archive = zip_of(archive_members)
    declared = len(a) + len(QUIET)  # audio members only: the rest is never written
    assert len(archive) + 4096 < declared
    try:
        with server.client(headers=KEY) as c:

            def refused(r) -> None:
                assert r.status_code == 507, r.text
                err = r.json()["error"]
                assert err["code"] == "insufficient_storage"
                assert "REFRAIN_MIN_FREE_BYTES" in err["message"]
                assert spool(data) == [] and n_jobs(data) == 0  # nothing written, no job

            files = [("files", ("a.wav", a)), ("files", ("b.wav", b))]
            disk.free = MIN_FREE + len(a) + len(b) - 1  # one byte short of upload + reserve
            refused(c.post("/v1/ingest", files=files))
            # the archive fits compressed but not extracted: its declared size is what counts
            disk.free = MIN_FREE + len(archive) + 4096
            refused(c.post("/v1/ingest", files={"archive": ("cat.zip", archive)}))
            refused(c.post("/v1/ingest", files={"archive": ("cat.tgz", tgz_of(archive_members))}))
            disk.free = 1 << 20
            refused(c.post("/v1/tracks", files={"audio": ("t.wav", a)}, data={"track_id": "t"}))
            assert c.get("/v1/tracks/t").status_code == 404
            metrics = c.get("/metrics").text
            assert 'refrain_errors_total{type="insufficient_storage"} 4.0' in metrics

            disk.free = MIN_FREE + len(a) + len(b)  # exactly enough
            assert c.post("/v1/ingest", files=files).status_code == 202
            disk.free = MIN_FREE + declared
            assert c.post("/v1/ingest", files={"archive": ("cat.zip", archive)}).status_code == 202
            disk.free = None  # the real disk again
            r = c.post("/v1/tracks", files={"audio": ("t.wav", a)}, data={"track_id": "t"})
            assert r.status_code == 201, r.text
            assert n_jobs(data) == 2

            # a reserve larger than any disk refuses on the real free-space figure too
            server.app.state.settings.min_free_bytes = 1 << 50
            r = c.post("/v1/tracks", files={"audio": ("u.wav", b)}, data={"track_id": "u"})
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
            server.app.state.settings.min_free_bytes = MIN_FREE
            r = c.post("/v1/tracks", files={"audio": ("u.wav", b)}, data={"track_id": "u"})
            assert r.status_code == 201, r.text
    finally:
        server.stop()


@pytest.mark.parametrize("pack", [zip_of, tgz_of])
def test_extract_archive_checks_space_before_writing(tmp_path, pack):
    members = {
        "a.wav": b"1" * 100,
        "dir/b.flac": b"2" * 50,
        "manifest.csv": b"filename\n",
        "readme.txt": b"3" * 1000,
    }
    seen = []
    out = extract_archive(
        io.BytesIO(pack(members)), tmp_path, ArchiveLimits(10, 1 << 20), seen.append
    )
    assert seen == [150] and len(out.files) == 2  # the audio members, declared sizes

    def full(n: int) -> None:
        raise InsufficientStorage("insufficient_storage", f"no room for {n} bytes")

    dest = tmp_path / "refused"
    dest.mkdir()
    with pytest.raises(RefrainError) as e:
        extract_archive(io.BytesIO(pack(members)), dest, ArchiveLimits(10, 1 << 20), full)
    assert isinstance(e.value, InsufficientStorage) and list(dest.iterdir()) == []


def test_space_guard_counts_the_write_and_the_reserve(tmp_path):
    free = storage.free_bytes(tmp_path)
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 << 20
    storage.SpaceGuard(tmp_path, 0).require(0)
    with pytest.raises(RefrainError) as e:
        storage.SpaceGuard(tmp_path, free).require(64 << 20, "the upload")
    assert isinstance(e.value, InsufficientStorage) and e.value.code == "insufficient_storage"
    assert "the upload needs 67108864 bytes" in e.value.message

    f = io.BytesIO(b"x" * 1000)
    f.seek(10)
    assert storage.stream_size(f) == 1000 and f.tell() == 10


def test_a_track_write_meets_one_guard_the_engines(tmp_path, disk):
    """POST /v1/tracks and the ingestion jobs meet the same guard, the engine's: it counts the
    track's index write (known once the audio is decoded), not the upload, and refuses (507)
    before anything is written."""
    server = LiveServer(
        Settings(
            data_dir=tmp_path / "data", model=str(CKPT_A), api_keys="k1", min_free_bytes=MIN_FREE
        )
    )
    a = wav(6, 0)
    try:
        engine = server.app.state.runtime.engine
        seconds = len(engine.decode(a, 60.0)) / engine.model.sample_rate
        n = storage.segment_count(
            seconds, engine.model.config.shingling.len, engine.settings.reference_hop_s
        )
        needed = storage.index_write_bytes(n, engine.model.zdim, seconds)
        assert needed < len(a)  # the upload would not fit where the index write does
        with server.client(headers=KEY) as c:
            disk.free = MIN_FREE + needed - 1
            r = c.post("/v1/tracks", files={"audio": ("t.wav", a)}, data={"track_id": "t"})
            assert r.status_code == 507, r.text
            err = r.json()["error"]
            assert err["code"] == "insufficient_storage"
            assert err["message"].startswith(f"the index write of {n} segments needs {needed} ")
            assert "REFRAIN_MIN_FREE_BYTES" in err["message"]
            assert c.get("/v1/tracks/t").status_code == 404
            (tmp_path / "t.wav").write_bytes(a)
            with pytest.raises(InsufficientStorage, match=f"index write of {n} segments"):
                engine.ingest_item(Item("t.wav", tmp_path / "t.wav", False, "t"), replace=False)
            assert len(engine.store) == 0

            disk.free = MIN_FREE + needed  # exactly enough for the index write
            r = c.post("/v1/tracks", files={"audio": ("t.wav", a)}, data={"track_id": "t"})
            assert r.status_code == 201, r.text
    finally:
        server.stop()
