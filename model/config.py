"""Model configuration: the same fields as the official CLEWS `configuration.yaml`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast


@dataclass(frozen=True)
class ShinglingConfig:
    len: float = 20.0  # shingle (segment) length in seconds; also the minimum input length
    hop: float = 20.0  # hop between shingles in training; inference picks its own


@dataclass(frozen=True)
class CQTConfig:
    hoplen: float = 0.02  # CQT hop in seconds
    noctaves: int = 7  # octaves above 32.7 Hz (C1)
    nbinsoct: int = 12  # bins per octave
    fscale: float = 1.0  # nnAudio filter_scale
    pool: int = 5  # average pooling over this many CQT frames


@dataclass(frozen=True)
class FrontendConfig:
    cqtpow: float = 0.5  # power applied to the CQT magnitude
    channels: tuple[int, int] = (128, 256)  # the two strided 12x3 convolutions


@dataclass(frozen=True)
class BackboneConfig:
    blocks: tuple[int, ...] = (3, 4, 6, 3)  # residual blocks per stage
    channels: tuple[int, ...] = (256, 512, 1024, 2048)  # output channels per stage
    down: tuple[int, ...] = (1, 2, 2, 1)  # stride of each stage's first block


@dataclass(frozen=True)
class LossConfig:
    pos: str = "bpwr-5"  # reduction for positive pairs (alignment)
    neg: str = "min"  # reduction for negative pairs (uniformity)
    gamma: float = 5.0  # uniformity temperature
    epsilon: float = 1e-6  # uniformity offset inside the log


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CLEWS network; defaults are the DiscogsVI model."""

    sample_rate: int = 16000  # input sample rate (data.samplerate)
    shingling: ShinglingConfig = field(default_factory=ShinglingConfig)
    cqt: CQTConfig = field(default_factory=CQTConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    zdim: int = 1024  # embedding dimension
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        b = self.backbone
        if not (len(b.blocks) == len(b.channels) == len(b.down)):
            raise ValueError(
                "backbone.blocks, backbone.channels and backbone.down must have the same length, "
                f"got {len(b.blocks)}, {len(b.channels)} and {len(b.down)}"
            )
        if self.zdim < 1 or self.sample_rate < 1000 or self.shingling.len <= 0:
            raise ValueError(
                f"invalid model config: zdim={self.zdim}, sample_rate={self.sample_rate}, "
                f"shingling.len={self.shingling.len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are rejected so typos do not pass silently."""
        return _build(cls, d)

    @classmethod
    def from_official(cls, conf: Mapping[str, Any]) -> ModelConfig:
        """From an official configuration (the whole YAML/DictConfig as a plain mapping).

        Only the fields the network needs are read; numbers written as strings
        (plain YAML reads `1e-6` as a string) are converted explicitly.
        """
        m = conf["model"]
        name = m.get("name", "clews")
        if name != "clews":
            raise ValueError(f"expected an official config with model.name 'clews', got {name!r}")
        loss = m.get("loss", {})
        redux = loss.get("redux", {})
        return cls(
            sample_rate=int(_num(conf.get("data", {}).get("samplerate", 16000))),
            shingling=ShinglingConfig(
                len=float(_num(m["shingling"]["len"])), hop=float(_num(m["shingling"]["hop"]))
            ),
            cqt=CQTConfig(
                hoplen=float(_num(m["cqt"]["hoplen"])),
                noctaves=int(_num(m["cqt"]["noctaves"])),
                nbinsoct=int(_num(m["cqt"]["nbinsoct"])),
                fscale=float(_num(m["cqt"]["fscale"])),
                pool=int(_num(m["cqt"]["pool"])),
            ),
            frontend=FrontendConfig(
                cqtpow=float(_num(m["frontend"]["cqtpow"])),
                channels=cast(
                    "tuple[int, int]", tuple(int(_num(c)) for c in m["frontend"]["channels"])
                ),
            ),
            backbone=BackboneConfig(
                blocks=tuple(int(_num(c)) for c in m["backbone"]["blocks"]),
                channels=tuple(int(_num(c)) for c in m["backbone"]["channels"]),
                down=tuple(int(_num(c)) for c in m["backbone"]["down"]),
            ),
            zdim=int(_num(m["zdim"])),
            loss=LossConfig(
                pos=str(redux.get("pos", "bpwr-5")),
                neg=str(redux.get("neg", "min")),
                gamma=float(_num(loss.get("gamma", 5))),
                epsilon=float(_num(loss.get("epsilon", 1e-6))),
            ),
        )


def _num(v: Any) -> float | int:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return float(v)
    raise ValueError(f"expected a number in the model configuration, got {v!r}")


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        default = fields[name].default_factory
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(default, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
