"""The track id rule, written once in `track_ids`: POST /v1/tracks, the ingestion jobs and the
catalogs of `refrain ingest` and `refrain index build` all check it and say it the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from refrain.service.catalog_files import read_catalog
from refrain.service.errors import InvalidInput
from refrain.service.settings import Settings
from refrain.service.sources import build_items
from refrain.service.track_ids import (
    TRACK_ID_RULE,
    basename_id,
    check_track_id,
    default_track_id,
    invalid_track_ids,
    valid_track_id,
)

from conftest import CKPT_A, LiveServer

KEY = {"Authorization": "Bearer k1"}
VALID = ["a", "Song 1", "album/01 - intro", "x:y@z+(1)'.-_", "é", "a" * 200]
INVALID = ["", "a" * 201, "a?", "../etc", "a/./b", "a//b", " a", "a /b", "/a", "a/", "a\x00b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("track-ids") / "data"
    srv = LiveServer(Settings(data_dir=data, model=str(CKPT_A), api_keys="k1"))
    yield srv
    srv.stop()


def test_the_rule():
    assert all(valid_track_id(t) for t in VALID)
    assert not any(valid_track_id(t) for t in INVALID)
    assert check_track_id("album/01") == "album/01"
    with pytest.raises(InvalidInput) as e:
        check_track_id("a?")
    assert e.value.code == "invalid_track_id"
    assert e.value.message == f"track_id must be {TRACK_ID_RULE}, got 'a?'"
    many = invalid_track_ids(["a?", "b" * 300])
    assert many.message == f"track ids must be {TRACK_ID_RULE}, got 'a?', {'b' * 50!r}"
    more = invalid_track_ids([f"{n}?" for n in range(25)]).message
    assert more.endswith("'19?' and 5 more")


@pytest.mark.parametrize(
    "path", ["a.wav", "dir/b c.flac", "x?y.mp3", "./.wav", "é ü/ñ.ogg", " a /b.wav", "a" * 300]
)
def test_ids_made_from_file_names_follow_the_rule(path):
    assert valid_track_id(default_track_id(path)) and valid_track_id(basename_id(path))
    assert default_track_id("dir/b c.flac") == "dir/b c" and basename_id("dir\\b.wav") == "b"


def test_every_user_of_the_rule_says_it(server, tmp_path):
    with pytest.raises(InvalidInput) as e:
        build_items([("a.wav", tmp_path / "a.wav")], {"a.wav": {"track_id": "a?"}}, owned=True)
    assert TRACK_ID_RULE in e.value.message

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "list.csv").write_text("filename,track_id\na.wav,../a\n")
    with pytest.raises(ValueError, match="track_id must be") as err:
        read_catalog(tmp_path / "list.csv")
    assert TRACK_ID_RULE in str(err.value) and str(tmp_path / "list.csv") in str(err.value)

    with server.client(headers=KEY) as c:
        r = c.post("/v1/tracks", files={"audio": ("a.wav", b"RIFF")}, data={"track_id": "a?"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_track_id"
        assert r.json()["error"]["message"] == f"track_id must be {TRACK_ID_RULE}, got 'a?'"
        manifest = ("manifest.csv", b"filename,track_id\na.wav,a?\n")
        r = c.post("/v1/ingest", files={"files": ("a.wav", b"RIFF"), "manifest": manifest})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_track_id"
        assert TRACK_ID_RULE in r.json()["error"]["message"]


def test_the_catalog_reader_names_the_files_it_cannot_find(tmp_path: Path):
    (tmp_path / "list.csv").write_text("filename\nmissing.wav\n")
    with pytest.raises(FileNotFoundError, match="row 1: no such file"):
        read_catalog(tmp_path / "list.csv")
