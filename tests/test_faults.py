"""bench/faults.py: every file of an index deleted, truncated or bit-flipped is either refused
with the index's own error (every file kept) or repaired with every acknowledged track intact;
nothing is lost in silence and nothing crashes."""

from __future__ import annotations

import importlib.util
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
    rows = load_bench().main(["--factory", factory])
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
