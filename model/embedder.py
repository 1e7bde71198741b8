"""`load_model` and the `Embedder`: audio in, one embedding per shingle out."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload

import numpy as np
import torch

from refrain.model.audio import AudioDecodeError, AudioTooLongError, check_samples, load_audio
from refrain.model.checkpoint import ModelIdentity, load_checkpoint, weights_sha256
from refrain.model.config import ModelConfig
from refrain.model.network import CLEWSNet
from refrain.model.shingle import ShingleCQT, cut_shingles

AudioInput = str | os.PathLike | bytes | BinaryIO | np.ndarray | torch.Tensor

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default"
DEFAULT_HOP_S = 5.0


def load_waveform(
    audio: AudioInput, sample_rate: int, max_duration_s: float | None = None
) -> torch.Tensor:
    """Any accepted input -> 1-D float32 tensor at `sample_rate`."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if isinstance(audio, np.ndarray):
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim == 2 and 1 in x.shape:
            x = x.reshape(-1)
        if x.ndim != 1:
            raise AudioDecodeError(
                f"expected a 1-D mono waveform at {sample_rate} Hz, got shape {x.shape}"
            )
        if x.size == 0:
            raise AudioDecodeError("waveform is empty")
        check_samples(x)
        if max_duration_s is not None and x.size > max_duration_s * sample_rate:
            raise AudioTooLongError(x.size / sample_rate, max_duration_s)
    else:
        x = load_audio(audio, sample_rate=sample_rate, max_duration_s=max_duration_s)
    return torch.from_numpy(np.ascontiguousarray(x))


@dataclass(frozen=True)
class EmbedOptions:
    hop_s: float = DEFAULT_HOP_S  # seconds between shingle starts
    batch_size: int = 32  # shingles per network call
    max_duration_s: float | None = None  # refuse longer audio (checked before full decode)


class Embedder:
    """A CLEWS network ready for inference, with its identity and audio front end."""

    def __init__(
        self, net: CLEWSNet, info: dict[str, Any] | None = None, device: str | None = None
    ) -> None:
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda":
            # PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissas) unless
            # told otherwise; float32 here means float32, so that a GPU worker's embeddings
            # match a CPU worker's (bfloat16/float16 are the opt-in fast precisions). The
            # switch is process-wide.
            torch.backends.cudnn.allow_tf32 = False
        self.net = net.eval().to(self.device)
        self.config: ModelConfig = net.config
        self.info = dict(info or {})
        self.dtype = torch.float32
        self._cqt = ShingleCQT(self.net.cqt[0], self.net.cqt[1])
        sha = self.info.get("weights_sha256") or weights_sha256(self.net.state_dict())
        self.identity = ModelIdentity(
            weights_sha256=sha,
            zdim=self.config.zdim,
            shingle_len_s=self.config.shingling.len,
            sample_rate=self.config.sample_rate,
        )

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def zdim(self) -> int:
        return self.config.zdim

    def set_precision(self, dtype: torch.dtype | str) -> Embedder:
        """float32 (default), or bfloat16/float16 autocast for the network on CUDA."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError(f"{dtype} inference is only supported on CUDA, not {self.device}")
        self.dtype = dtype
        return self

    # -- input handling ------------------------------------------------------------------------

    def waveform(self, audio: AudioInput, max_duration_s: float | None = None) -> torch.Tensor:
        """Any accepted input -> 1-D float32 tensor at the model's sample rate."""
        return load_waveform(audio, self.sample_rate, max_duration_s)

    def _lengths(self, hop_s: float) -> tuple[int, int, int]:
        if not (hop_s > 0 and np.isfinite(hop_s)):
            raise ValueError(f"hop must be a positive number of seconds, got {hop_s}")
        sr = self.sample_rate
        length = int(sr * self.config.shingling.len)
        hop = int(sr * hop_s)
        if hop < 1:
            raise ValueError(f"hop {hop_s} s is shorter than one sample")
        return length, hop, length

    # -- embedding -----------------------------------------------------------------------------

    @torch.inference_mode()
    def spectrogram(self, x: torch.Tensor, hop_s: float = DEFAULT_HOP_S) -> torch.Tensor:
        """Waveform (T,) -> pooled CQT of each shingle (S, bins, frames)."""
        length, hop, min_length = self._lengths(hop_s)
        x = x.to(self.device)
        if self._cqt.supports(length, hop, min_length):
            return self._cqt(x, length, hop)
        return self._cqt.per_shingle(cut_shingles(x, length, hop, min_length))

    @torch.inference_mode()
    def embed_spectrograms(self, cqt: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, bins, frames) -> (N, zdim) float32, in network batches of `batch_size`."""
        out = []
        for i in range(0, len(cqt), batch_size):
            chunk = cqt[i : i + batch_size].to(self.device)
            if self.dtype != torch.float32:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    out.append(self.net(chunk).float())
            else:
                out.append(self.net(chunk))
        return torch.cat(out) if out else torch.empty(0, self.zdim)

    def embed(
        self, audio: AudioInput, hop: float = DEFAULT_HOP_S, max_duration_s: float | None = None
    ) -> np.ndarray:
        """Audio (path, bytes, file object, 16 kHz mono array or tensor) -> (S, zdim) float32."""
        x = self.waveform(audio, max_duration_s=max_duration_s)
        z = self.embed_spectrograms(self.spectrogram(x, hop))
        return check_embeddings(z.cpu().numpy().astype(np.float32, copy=False))

    @overload
    def embed_many(
        self,
        items: Sequence[AudioInput] | Iterable[AudioInput],
        hop: float = ...,
        batch_size: int = ...,
        max_duration_s: float | None = ...,
        progress: bool = ...,
        errors: Literal["raise"] = ...,
    ) -> list[np.ndarray]: ...
    @overload
    def embed_many(
        self,
        items: Sequence[AudioInput] | Iterable[AudioInput],
        hop: float = ...,
        batch_size: int = ...,
        max_duration_s: float | None = ...,
        progress: bool = ...,
        *,
        errors: str,
    ) -> list[np.ndarray | None]: ...
    def embed_many(
        self,
        items: Sequence[AudioInput] | Iterable[AudioInput],
        hop: float = DEFAULT_HOP_S,
        batch_size: int = 32,
        max_duration_s: float | None = None,
        progress: bool = False,
        errors: str = "raise",
    ) -> list[np.ndarray] | list[np.ndarray | None]:
        """Embed many inputs, packing shingles of consecutive files into full network batches.

        Decoding of the next file overlaps with the network on the current batch. With
        `errors="skip"`, inputs that fail to decode give None instead of raising.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        items = list(items)
        results: list[np.ndarray | None] = [None] * len(items)
        pending: list[tuple[int, torch.Tensor]] = []  # (item index, its CQT segments)
        bar = tqdm(total=len(items), desc="embed", unit="file", disable=not progress)

        def prepare(i: int) -> tuple[int, torch.Tensor | None, Exception | None]:
            try:
                x = self.waveform(items[i], max_duration_s=max_duration_s)
                return i, self.spectrogram(x, hop), None
            except (AudioDecodeError, OSError) as e:
                return i, None, e

        def flush(force: bool) -> None:
            while pending and (force or sum(len(c) for _, c in pending) >= batch_size):
                cqt = torch.cat([c for _, c in pending])
                z = self.embed_spectrograms(cqt, batch_size).cpu().numpy()
                pos = 0
                for i, c in pending:
                    zi = z[pos : pos + len(c)]
                    pos += len(c)
                    if errors == "raise":
                        check_embeddings(zi)
                    results[i] = zi if np.isfinite(zi).all() else None  # skipped as undecodable
                    bar.update(1)
                pending.clear()

        with ThreadPoolExecutor(max_workers=1) as pool:
            futures = [pool.submit(prepare, 0)] if items else []
            for n in range(len(items)):
                i, cqt, err = futures[n].result()
                if n + 1 < len(items):
                    futures.append(pool.submit(prepare, n + 1))
                if err is not None:
                    if errors == "raise":
                        raise err
                    bar.update(1)
                    continue
                assert cqt is not None  # prepare gives a CQT or an error
                pending.append((i, cqt))
                flush(force=False)
            flush(force=True)
        bar.close()
        return results


def check_embeddings(z: np.ndarray) -> np.ndarray:
    """`z` unchanged, or AudioDecodeError when the network gave NaN or infinite values (audio
    that decodes but that the network cannot represent): such vectors are never stored."""
    if not np.isfinite(z).all():
        raise AudioDecodeError("the network gave non-finite embeddings for this audio")
    return z


def transposed(cqt: torch.Tensor, shifts: Sequence[int]) -> torch.Tensor:
    """CQT shingles (S, bins, frames) -> (len(shifts) * S, bins, frames): the shingles rolled by
    each shift in turn (bins; semitones at 12 bins per octave), as the training pitch roll does.
    A positive shift raises the pitch."""
    if tuple(shifts) == (0,):
        return cqt
    return torch.cat([torch.roll(cqt, int(s), dims=1) if s else cqt for s in shifts])


def load_model(
    path_or_name: str | os.PathLike | None = None, device: str | None = None
) -> Embedder:
    """Load a model: an official CLEWS checkpoint, a Refrain model folder, or (None) the default."""
    if path_or_name is None or str(path_or_name) == "default":
        path_or_name = DEFAULT_MODEL
    net, info = load_checkpoint(path_or_name)
    if info.get("trained") is False:
        logging.getLogger("refrain").warning(
            "model %s is an untrained placeholder (%s): its embeddings do not find versions; "
            "pass an official CLEWS checkpoint or a trained Refrain model",
            info.get("name", path_or_name),
            info.get("note", "random weights"),
        )
    return Embedder(net, info, device=device)
