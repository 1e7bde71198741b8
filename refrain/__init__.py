"""Refrain: find the musical versions of a short audio clip in a reference catalog.

    from refrain import load_model, open_index

    model = load_model()                          # the shipped default model
    vectors = model.embed("song.flac", hop=5.0)   # (n_segments, dim) float32

The packages, each depending only on those before it: `refrain.model` (audio, the CLEWS
network, checkpoints, reductions, alignment), `refrain.index` (the crash-safe segment store),
`refrain.search` (ranking: candidates, reductions, verification), `refrain.service` (the REST
service and the `refrain` command line) and `refrain.training` (training, evaluation,
calibration and the version corpus, which the service never imports).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

# the public names, imported on first use so that `import refrain.index` does not load torch
_EXPORTS = {
    "EmbedOptions": "refrain.model",
    "Embedder": "refrain.model",
    "load_model": "refrain.model",
    "TrackRecord": "refrain.index",
    "open_index": "refrain.index",
}

try:
    __version__ = version("refrain")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0.0.0"

__all__ = ["EmbedOptions", "Embedder", "TrackRecord", "__version__", "load_model", "open_index"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
