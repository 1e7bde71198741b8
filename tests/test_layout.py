"""The shape of the package: one installed namespace, an HTTP-free core, one store Protocol."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refrain.index import SegmentStore, TrackRecord, open_index

ROOT = Path(__file__).resolve().parents[1]

# the service's HTTP layer: the only modules that may speak in HTTP statuses
HTTP_LAYER = {
    "app.py",
    "http_errors.py",
    "auth.py",
    "deps.py",
    "forms.py",
    "pages.py",
    "worker_app.py",
}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("refrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"refrain"}, top
    for module in (
        "refrain/__init__.py",
        "refrain/model/embedder.py",
        "refrain/index/store.py",
        "refrain/service/engine.py",
        "refrain/model/weights/default/config.json",
        "refrain/training/corpus/bach_melodies.json",
        "refrain/service/console/index.html",
        "refrain/service/console/console.js",
    ):
        assert module in names, module
    # every module of every package, none left out of the package list
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            module = f"refrain/{path.relative_to(ROOT)}"
            assert module in names, module


def test_the_public_names_import_lazily():
    code = (
        "import sys, refrain.index; assert 'torch' not in sys.modules; "
        "from refrain import load_model, open_index; import refrain; "
        "print(refrain.__version__, load_model.__module__, open_index.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1:] == ["refrain.model.embedder", "refrain.index.store"]


def _http_names(path: Path) -> list[str]:
    """Names from the HTTP world a module imports or uses: ApiError, fastapi, starlette."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in ("fastapi", "starlette"):
                found.append(node.module)
            found += [a.name for a in node.names if a.name == "ApiError"]
        elif isinstance(node, ast.Import):
            found += [
                a.name for a in node.names if a.name.split(".")[0] in ("fastapi", "starlette")
            ]
        elif isinstance(node, ast.Name) and node.id == "ApiError":
            found.append("ApiError")
    return found


def test_http_stays_in_the_http_layer():
    offenders = {}
    for path in sorted((ROOT / "service").glob("*.py")):
        if path.name not in HTTP_LAYER and (names := _http_names(path)):
            offenders[path.name] = sorted(set(names))
    for folder in ("model", "index", "search", "training"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if names := _http_names(path):
                offenders[str(path.relative_to(ROOT))] = sorted(set(names))
    assert offenders == {}
    # the routes speak HTTP, but raise the core's domain errors, not statuses of their own
    for path in sorted((ROOT / "service" / "routes").glob("*.py")):
        assert "ApiError" not in _http_names(path), path.name


def test_the_core_maps_every_domain_error_to_one_status():
    from refrain.service import errors as ex
    from refrain.service.http_errors import STATUS, classify

    kinds = [
        c
        for c in vars(ex).values()
        if isinstance(c, type) and issubclass(c, ex.RefrainError) and c is not ex.RefrainError
    ]
    for kind in kinds:
        err = classify(kind("some_code", "a message"))
        assert err.code == "some_code" and err.message == "a message"
        assert 400 <= err.status < 600 and any(k in STATUS for k in kind.__mro__), kind
    assert classify(ex.UnsafeArchive("unsafe_archive", "m")).status == 422
    assert classify(ex.not_ready("loading")).headers == {"Retry-After": "5"}


def test_both_backends_are_segment_stores(tmp_path):
    identity = {"model": "test", "zdim": 8}
    with open_index(tmp_path / "faiss", identity) as faiss_store:
        assert isinstance(faiss_store, SegmentStore)
        rng = np.random.default_rng(0)
        faiss_store.add_track(
            TrackRecord("a"), rng.standard_normal((3, 8), dtype=np.float32), np.arange(3.0)
        )
        with pytest.raises(ValueError, match="repeated"):
            faiss_store.add_tracks(
                [(TrackRecord("b"), np.zeros((1, 8), np.float32), np.zeros(1))] * 2
            )
    pytest.importorskip("milvus_lite")
    from refrain.index.milvus import open_milvus_index

    with open_milvus_index(tmp_path / "milvus", identity) as milvus_store:
        assert isinstance(milvus_store, SegmentStore)
        with pytest.raises(ValueError, match="repeated"):
            milvus_store.add_tracks(
                [(TrackRecord("b"), np.zeros((1, 8), np.float32), np.zeros(1))] * 2
            )


# which packages each package may import: dependencies flow one way, and the service never
# loads training (its command line registers the training subcommands, imported on use)
ALLOWED = {
    "model": {"model"},
    "index": {"index"},
    "search": {"search", "index", "model"},
    "service": {"service", "search", "index", "model"},
    # the served evaluation (training/served.py) ranks through the service's own engine
    "training": {"training", "service", "search", "index", "model"},
}
COMMAND_LINE = {"service/cli.py"}  # the `refrain` entry point registers every package's commands


def _refrain_imports(path: Path) -> set[str]:
    """The refrain packages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "refrain" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_dependencies_flow_one_way():
    offenders = {}
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            extra = _refrain_imports(path) - allowed - {"__version__"}
            if name in COMMAND_LINE:
                extra -= {"training"}
            if extra:
                offenders[name] = sorted(extra)
    assert offenders == {}


def test_the_service_loads_no_training_or_corpus_module():
    code = (
        "import sys, refrain.service.app, refrain.service.worker_app; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('refrain.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "refrain.service.app" in loaded and "refrain.search.ranking" in loaded
    assert [m for m in loaded if m.startswith("refrain.training")] == []
    assert not any("corpus" in m for m in loaded)


def test_the_training_subcommands_stay_on_the_command_line():
    from refrain.service.cli import build_parser

    parser = build_parser()
    for argv in (
        ["embed", "a.flac", "--out", "z"],
        ["convert", "a.ckpt", "out"],
        ["interpolate", "a", "b", "out"],
        ["evaluate", "--manifest", "m.csv"],
        ["train", "configs/default.yaml"],
        ["calibrate", "model", "--manifest", "m.csv"],
        ["corpus", "works"],
    ):
        assert callable(parser.parse_args(argv).func), argv
