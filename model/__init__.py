"""Refrain's model library: audio decoding, the CLEWS network, checkpoints, reductions, metrics.

from refrain.model import load_model
model = load_model()                      # the shipped default
z = model.embed("song.flac", hop=5.0)     # (n_segments, zdim) float32
"""

from refrain.model.checkpoint import CheckpointError, ModelIdentity
from refrain.model.config import ModelConfig
from refrain.model.embedder import Embedder, EmbedOptions, load_model

__all__ = [
    "CheckpointError",
    "EmbedOptions",
    "Embedder",
    "ModelConfig",
    "ModelIdentity",
    "load_model",
]
