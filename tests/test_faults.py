"""bench/faults.py: every file of an index deleted, truncated or bit-flipped is either refused
with the index's own error (every file kept) or repaired with every acknowledged track intact,
and so is every kill -9 of a process adding tracks or writing a snapshot (`refrain index
snapshot`); nothing is lost in silence and nothing crashes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_faults", ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_no_damage_to_any_index_file_loses_data_in_silence(factory, capsys):
    # the kill -9 cases run once, on the index with an ANN file (its snapshot takes longest)
    rows = load_bench().main(["--factory", factory, *(["--no-kills"] if factory == "Flat" else [])])
    table = capsys.readouterr().out
    files = {r["file"] for r in rows}
    assert {"journal.log", "catalog.sqlite", "snapshot/MANIFEST.json"} <= files
    assert any(f.endswith(".vectors.npy") for f in files)
    assert ("snapshot/ann-1.faiss" in files) == (factory == "HNSW8")
    bad = [r for r in rows if r["outcome"] not in ("refused", "repaired")]
    assert not bad, table
    # the derived files are rebuilt; the journal and snapshot, which are the truth, are not
    by = {(r["file"], r["fault"]): r["outcome"] for r in rows}
    assert {by[("catalog.sqlite", f)] for f in ("delete", "truncate", "flip")} == {"repaired"}
    assert by[("journal.log", "truncate")] == "refused"
    assert by[("snapshot/chunk-1.vectors.npy", "flip")] == "refused"
    kills = [r for r in rows if r["fault"].startswith("kill -9")]
    assert len(kills) == (0 if factory == "Flat" else 8)
    if kills:
        # the uninterrupted snapshot finished; the earliest kill landed before it could
        assert by[("(snapshot)", "kill -9 at 100%")] == "repaired"
        assert "finished" in next(r for r in kills if r["fault"] == "kill -9 at 100%")["detail"]
        assert "killed" in next(r for r in kills if r["fault"] == "kill -9 at 0%")["detail"]


def test_index_snapshot_command_refuses_an_open_index_and_a_missing_one(tmp_path):
    bench = load_bench()
    index = tmp_path / "data" / "index"
    bench.build(index, 3, 2, "Flat")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from refrain.service.cli import main; sys.exit(main())",
    ]
    snapshot = [*cmd, "index", "snapshot", "--data", str(tmp_path / "data")]
    from refrain.index import open_index

    with open_index(index, bench.IDENTITY, create=False):  # as a running service holds it
        r = subprocess.run(snapshot, capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "already open for writing" in r.stderr, r.stderr
    r = subprocess.run(snapshot, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "5 tracks written" in r.stdout, r.stderr
    assert (index / "journal.log").stat().st_size < 64  # the journal now holds no record
    missing = [*cmd, "index", "snapshot", "--data", str(tmp_path / "nothing")]
    r = subprocess.run(missing, capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "index.json is missing" in r.stderr, r.stderr
