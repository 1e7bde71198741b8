"""One manifest reader for `POST /v1/ingest` and the catalogs of `refrain ingest`: the file
column is `filename` (canonical) or `path`, either way on both."""

from __future__ import annotations

import json

import pytest

from refrain.service.catalog_files import Entry, read_catalog
from refrain.service.cli import main
from refrain.service.errors import InvalidInput
from refrain.service.manifests import parse_manifest
from refrain.service.settings import Settings

from conftest import CKPT_A, LiveServer

KEY = {"Authorization": "Bearer k1"}
ROWS = "a.wav,id-a,Title A,Artist,W1\nsub/b.wav,,,,\n"
PARSED = {
    "a.wav": {
        "filename": "a.wav",
        "track_id": "id-a",
        "title": "Title A",
        "artist": "Artist",
        "work_id": "W1",
    },
    "sub/b.wav": {"filename": "sub/b.wav"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("manifests") / "data"
    srv = LiveServer(Settings(data_dir=data, model=str(CKPT_A), api_keys="k1"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("column", ["filename", "path"])
def test_both_file_columns_read_the_same(column):
    csv = f"{column},track_id,title,artist,work_id\n{ROWS}".encode()
    assert parse_manifest(csv, "m.csv") == PARSED
    rows = [{column: "a.wav", "track_id": "id-a", "title": "Title A", "artist": "Artist"}]
    rows[0]["work_id"] = "W1"
    rows.append({column: "sub/b.wav", "title": None})
    assert parse_manifest(json.dumps(rows).encode(), "m.json") == PARSED


def test_the_reader_names_the_canonical_column():
    with pytest.raises(InvalidInput) as e:
        parse_manifest(b"file,track_id\na.wav,x\n", "m.csv")
    assert e.value.code == "invalid_manifest"
    assert "filename,track_id,title,artist,work_id (only filename is required; path is " in (
        e.value.message
    )
    with pytest.raises(InvalidInput, match="both filename and path"):
        parse_manifest(b"filename,path\na.wav,a.wav\n", "m.csv")
    with pytest.raises(InvalidInput, match="both filename and path"):
        parse_manifest(b'[{"filename": "a.wav", "path": "b.wav"}]', "m.json")
    with pytest.raises(InvalidInput, match=r"row 1 has unknown fields \['size'\]"):
        parse_manifest(b'[{"path": "a.wav", "size": 3}]', "m.json")


@pytest.mark.parametrize("column", ["filename", "path"])
def test_the_command_line_reads_both(tmp_path, column):
    for name in ("a.wav", "sub/b.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"RIFF")
    (tmp_path / "list.csv").write_text(f"{column},track_id,title,artist,work_id\n{ROWS}")
    assert read_catalog(tmp_path / "list.csv") == [
        Entry(tmp_path / "a.wav", "a.wav", "id-a", "Title A", "Artist", "W1"),
        Entry(tmp_path / "sub/b.wav", "sub/b.wav", "sub/b", "b", "", ""),
    ]


def test_the_command_line_reports_a_bad_manifest_in_one_line(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("file,track_id\na.wav,x\n")
    assert main(["ingest", str(tmp_path / "list.csv"), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refrain ingest: error: ") and "only filename is required" in err


@pytest.mark.parametrize("column", ["filename", "path"])
def test_the_service_reads_both(server, column):
    manifest = f"{column},track_id,title\na.wav,id-a,Title A\nb.wav,,\n".encode()
    files = [
        ("files", ("a.wav", b"RIFF")),
        ("files", ("b.wav", b"RIFF")),
        ("manifest", ("manifest.csv", manifest)),
    ]
    with server.client(headers=KEY) as c:
        r = c.post("/v1/ingest", files=files)
        assert r.status_code == 202, r.text
        job = c.get(f"/v1/jobs/{r.json()['job_id']}", params={"items": "true"}).json()
    items = [(i["filename"], i["track_id"]) for i in job["items"]]
    assert items == [("a.wav", "id-a"), ("b.wav", "b")]
