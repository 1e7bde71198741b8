"""Refrain's model library: audio decoding, the CLEWS network, checkpoints, reductions, metrics.

    from model import load_model
    model = load_model()                      # the shipped default
    z = model.embed("song.flac", hop=5.0)     # (n_segments, zdim) float32
"""

from model.checkpoint import CheckpointError, ModelIdentity
from model.config import ModelConfig
from model.embedder import Embedder, EmbedOptions, load_model

__all__ = ["CheckpointError", "EmbedOptions", "Embedder", "ModelConfig", "ModelIdentity", "load_model"]
