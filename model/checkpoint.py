"""Checkpoint formats: the official CLEWS one (read only) and Refrain's own.

Official: `torch.save`d dict {model, optim, sched, conf, epoch, lr, cost_best} written
by Lightning Fabric, with `configuration.yaml` beside it. `conf` is an omegaconf
DictConfig; it is unpickled into inert stand-in classes through torch's weights-only
unpickler with an explicit allow-list, so neither omegaconf nor lightning is needed
and a file that asks to call anything else is refused.

Refrain: a folder (or a single `.safetensors` file) holding `model.safetensors`
(weights, with the JSON config in its metadata) and `config.json`. nnAudio's CQT
kernels are not stored when they equal the ones nnAudio computes from the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from refrain.model.config import ModelConfig
from refrain.model.network import CLEWSNet, make_cqt

FORMAT_VERSION = 1
CQT_PREFIX = "cqt."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that is refused as unsafe."""


@dataclass(frozen=True)
class ModelIdentity:
    """What an index must agree on with the model that fills it."""

    weights_sha256: str  # hash of the learned weights and buffers (CQT kernels excluded)
    zdim: int  # embedding dimension
    shingle_len_s: float  # segment length in seconds
    sample_rate: int  # audio sample rate the model expects

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights_sha256": self.weights_sha256,
            "zdim": self.zdim,
            "shingle_len_s": self.shingle_len_s,
            "sample_rate": self.sample_rate,
        }


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Order-independent hash of a state dict's names, dtypes, shapes and values.

    The CQT kernels are left out: they follow from the config, and nnAudio versions
    may differ in their last bits.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        if name.startswith(CQT_PREFIX):
            continue
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- official format ---------------------------------------------------------------------------


class _ContainerStandIn:
    """Inert replacement for omegaconf containers and nodes: just keeps the pickled state."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _standin(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_ContainerStandIn,), {})


# Globals an official checkpoint's pickle refers to besides tensors and plain containers.
_OFFICIAL_GLOBALS = {
    "omegaconf.dictconfig.DictConfig": _standin("omegaconf.dictconfig.DictConfig"),
    "omegaconf.listconfig.ListConfig": _standin("omegaconf.listconfig.ListConfig"),
    "omegaconf.base.ContainerMetadata": _standin("omegaconf.base.ContainerMetadata"),
    "omegaconf.base.Metadata": _standin("omegaconf.base.Metadata"),
    "omegaconf.nodes.AnyNode": _standin("omegaconf.nodes.AnyNode"),
    "omegaconf.nodes.StringNode": _standin("omegaconf.nodes.StringNode"),
    "omegaconf.nodes.IntegerNode": _standin("omegaconf.nodes.IntegerNode"),
    "omegaconf.nodes.FloatNode": _standin("omegaconf.nodes.FloatNode"),
    "omegaconf.nodes.BooleanNode": _standin("omegaconf.nodes.BooleanNode"),
    "typing.Any": Any,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
    "builtins.list": list,
    "builtins.dict": dict,
    "collections.defaultdict": __import__("collections").defaultdict,
}


def _plain(obj: Any) -> Any:
    """Stand-in omegaconf objects -> plain dicts, lists and scalars."""
    if isinstance(obj, _ContainerStandIn):
        state = obj.__dict__.get("state", {})
        if isinstance(state, dict) and "_content" in state:
            return _plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:
            return _plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_official(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official checkpoint safely -> (model state dict, configuration as a dict)."""
    path = Path(path)
    allow: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (obj, name) for name, obj in _OFFICIAL_GLOBALS.items()
    ]
    try:
        with torch.serialization.safe_globals(allow), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain CLEWS checkpoint (its pickle asks for "
            f"something outside the allow-list of tensors, containers and omegaconf configs): {e}"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(
            f"{path} is not an official CLEWS checkpoint: expected a dict with a 'model' state "
            f"dict, got keys {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}"
        )
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    yaml_path = path.parent / "configuration.yaml"
    if yaml_path.exists():
        with open(yaml_path) as f:
            conf = yaml.safe_load(f)
    elif ckpt.get("conf") is not None:
        conf = _plain(ckpt["conf"])
    else:
        raise CheckpointError(f"{path} has no configuration: expected {yaml_path} or 'conf' inside")
    if not isinstance(conf, dict) or "model" not in conf:
        raise CheckpointError(f"the configuration of {path} has no 'model' section")
    return state, conf


# -- Refrain format ----------------------------------------------------------------------------


def _cqt_matches(state: dict[str, torch.Tensor], config: ModelConfig) -> bool:
    fresh = {CQT_PREFIX + k: v for k, v in make_cqt(config).state_dict().items()}
    for name, t in fresh.items():
        if name not in state or state[name].shape != t.shape:
            return False
        if not torch.allclose(state[name].float(), t.float(), rtol=0, atol=1e-7):
            return False
    return True


def save_refrain(
    net: CLEWSNet, path: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Write `net` in Refrain's format into the folder `path`; returns the folder."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if _cqt_matches(state, net.config):
        state = {k: v for k, v in state.items() if not k.startswith(CQT_PREFIX)}
    meta = {
        "format": "refrain",
        "format_version": FORMAT_VERSION,
        "config": net.config.to_dict(),
        "weights_sha256": weights_sha256(state),
        "zdim": net.config.zdim,
        "shingle_len_s": net.config.shingling.len,
        "sample_rate": net.config.sample_rate,
        **(extra or {}),
    }
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"refrain": json.dumps(meta)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "model.safetensors")
    with open(out / "config.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(out / "config.json.tmp", out / "config.json")
    return out


def read_refrain(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read Refrain's format (folder or .safetensors file) -> (state dict, metadata)."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta_json = (f.metadata() or {}).get("refrain")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read Refrain weights {weights}: {e}") from e
    if meta_json is None:
        cfg = weights.parent / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{weights} carries no Refrain config and {cfg} does not exist")
        meta_json = cfg.read_text()
    meta = json.loads(meta_json)
    if meta.get("format") != "refrain":
        raise CheckpointError(f"{weights} is not in Refrain's format (format={meta.get('format')})")
    digest = weights_sha256(state)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} is corrupt: its weights hash to {digest[:12]}..., "
            f"the config says {str(meta.get('weights_sha256'))[:12]}..."
        )
    return state, meta


# -- building a network ------------------------------------------------------------------------


def build_network(state: dict[str, torch.Tensor], config: ModelConfig) -> CLEWSNet:
    """A network in eval mode holding `state`; CQT kernels come from nnAudio if absent."""
    net = CLEWSNet(config)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(CQT_PREFIX)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "checkpoint does not match its configuration: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    net.load_state_dict(state, strict=False)
    return net.eval()


def load_checkpoint(path: str | os.PathLike) -> tuple[CLEWSNet, dict[str, Any]]:
    """Load either format -> (network, info). Official checkpoints are recognised by content."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    if p.is_dir():
        if (p / "model.safetensors").exists():
            return _load_refrain(p)
        ckpts = sorted(p.glob("*.ckpt"))
        if (p / "checkpoint_best.ckpt").exists():
            ckpts = [p / "checkpoint_best.ckpt"]
        if len(ckpts) != 1:
            raise CheckpointError(
                f"{p} holds neither model.safetensors nor exactly one official *.ckpt "
                f"(found {[c.name for c in ckpts]})"
            )
        p = ckpts[0]
    with open(p, "rb") as f:
        head = f.read(8)
    if p.suffix == ".safetensors" or not (head.startswith(b"PK") or head[:1] == b"\x80"):
        return _load_refrain(p)
    state, conf = read_official(p)
    config = ModelConfig.from_official(conf)
    net = build_network(state, config)
    info = {"format": "official", "path": str(p), "weights_sha256": weights_sha256(state)}
    return net, info


def _load_refrain(p: Path) -> tuple[CLEWSNet, dict[str, Any]]:
    state, meta = read_refrain(p)
    config = ModelConfig.from_dict(meta["config"])
    net = build_network(state, config)
    info = {k: v for k, v in meta.items() if k != "config"}
    info["path"] = str(p)
    return net, info


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Official checkpoint -> Refrain folder; checks that the result embeds identically."""
    net, info = load_checkpoint(src)
    out = save_refrain(net, dst, extra={"converted_from": Path(info["path"]).name})
    back, _ = load_checkpoint(out)
    probe = torch.rand(2, net.config.cqt.noctaves * net.config.cqt.nbinsoct, 200)
    with torch.inference_mode():
        diff = (back(probe) - net(probe)).abs().max().item()
    if not np.isfinite(diff) or diff > 0:
        raise CheckpointError(f"conversion changed the network's output by {diff}")
    return out


def interpolate(
    a: str | os.PathLike, b: str | os.PathLike, weight: float, dst: str | os.PathLike
) -> Path:
    """Write the network whose weights are ``(1 - weight) * a + weight * b`` into `dst`.

    Both checkpoints must have one configuration, e.g. a model and the same model trained
    further: the mean of the two keeps some of what each one does best (weight-space
    ensembling). Integer buffers (batch-norm step counts) are taken from `b`. The result is
    untrained if either is, keeps the training loss both share, and has no calibration, since
    its distances are neither model's: refit it (`refrain calibrate`).
    """
    if not (np.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"expected an interpolation weight in [0, 1], got {weight!r}")
    net_a, info_a = load_checkpoint(a)
    net_b, info_b = load_checkpoint(b)
    if net_a.config.to_dict() != net_b.config.to_dict():
        raise CheckpointError(f"{a} and {b} have different configurations: cannot interpolate")
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    mixed = {
        key: ((1 - weight) * value.float() + weight * state_b[key].float()).to(value.dtype)
        if value.is_floating_point()
        else state_b[key]
        for key, value in state_a.items()
    }
    net_a.load_state_dict(mixed)
    extra = {
        # a placeholder on either side makes the result one too (load_model warns of it)
        "trained": info_a.get("trained") is not False and info_b.get("trained") is not False,
        "interpolated": {
            "weight": weight,
            "a": info_a["weights_sha256"],
            "b": info_b["weights_sha256"],
        },
    }
    if "loss" in info_a and info_a.get("loss") == info_b.get("loss"):
        extra["loss"] = info_a["loss"]  # what both were trained with
    return save_refrain(net_a.eval(), dst, extra=extra)
