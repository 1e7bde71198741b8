"""Refrain's model library: audio decoding, the CLEWS network, checkpoints, reductions, metrics.

from refrain.model import load_model
model = load_model()                      # the shipped default
z = model.embed("song.flac", hop=5.0)     # (n_segments, zdim) float32
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refrain.model.checkpoint import CheckpointError, ModelIdentity
    from refrain.model.config import ModelConfig
    from refrain.model.embedder import Embedder, EmbedOptions, load_model

# the public names, imported on first use so that `refrain.model.audio` (and the command line's
# argument parsing) does not load torch
_EXPORTS = {
    "CheckpointError": "refrain.model.checkpoint",
    "ModelIdentity": "refrain.model.checkpoint",
    "ModelConfig": "refrain.model.config",
    "EmbedOptions": "refrain.model.embedder",
    "Embedder": "refrain.model.embedder",
    "load_model": "refrain.model.embedder",
}

__all__ = [
    "CheckpointError",
    "EmbedOptions",
    "Embedder",
    "ModelConfig",
    "ModelIdentity",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refrain.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
