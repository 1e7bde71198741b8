"""The tracks and clips of an evaluation: seeded query offsets, tracks decoded ahead of the
network, every track's whole embedding (or features) and its query clips', and the distance
blocks between queries and candidates under a segment distance reduction.

`refrain.training.evaluate` scores what these produce; `refrain.training.verified` re-ranks it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from refrain.model.audio import AudioDecodeError
from refrain.model.reduce import track_distance

if TYPE_CHECKING:
    from refrain.training.evaluate import EvalOptions, Item, TrackEncoder

_CHUNK_TRACKS = 8  # tracks whose whole audio and query clips go through one embed_many call
_DECODE_AHEAD = 8  # tracks decoded ahead of the network
_QUERY_BLOCK = 64  # query tracks scored per distance block
_CAND_BLOCK = 512  # candidate tracks padded together per distance block


# -- embedding -------------------------------------------------------------------------------


def query_draws(opts: EvalOptions, n: int) -> dict[float, np.ndarray]:
    """Uniform draws in [0, 1) placing each query, (n, queries_per_track) per query length.

    Each length has its own stream seeded by (seed, milliseconds), drawn over all items in
    manifest order: a track's offsets depend neither on which other lengths are evaluated
    nor on other tracks failing to decode.
    """
    return {
        tau: np.random.default_rng([opts.seed, round(tau * 1000)]).random(
            (n, opts.queries_per_track)
        )
        for tau in opts.query_seconds
    }


def clip_start(u: float, n_samples: int, length: int) -> int:
    """The first sample of a clip of `length` samples placed by the draw `u` in [0, 1) in a
    track of `n_samples` (0 when the track is no longer than the clip)."""
    return int(u * (n_samples - length + 1)) if n_samples > length else 0


def _decoded(
    model: TrackEncoder,
    items: Sequence[Item],
    waveforms: Sequence[np.ndarray | torch.Tensor] | None,
    max_samples: int | None,
) -> Iterator[tuple[int, torch.Tensor | str]]:
    """(index, waveform or error message) for every item, in order, decoded ahead in threads."""

    def load(i: int) -> torch.Tensor | str:
        source = waveforms[i] if waveforms is not None else items[i].path
        if source is None:
            raise ValueError(f"item {i} ({items[i].clique}) has neither a path nor a waveform")
        try:
            x = model.waveform(source)
        except (AudioDecodeError, OSError) as e:
            return str(e) or type(e).__name__
        return x[:max_samples] if max_samples is not None else x

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[tuple[int, Future[torch.Tensor | str]]] = deque()
        for i in range(len(items)):
            pending.append((i, pool.submit(load, i)))
            if len(pending) > _DECODE_AHEAD:
                j, future = pending.popleft()
                yield j, future.result()
        while pending:
            j, future = pending.popleft()
            yield j, future.result()


def embed_all(
    model: TrackEncoder,
    items: Sequence[Item],
    opts: EvalOptions,
    embeddings: Sequence[np.ndarray] | None,
    waveforms: Sequence[np.ndarray | torch.Tensor] | None,
    progress: bool,
) -> tuple[
    list[np.ndarray | None],
    dict[float, list[tuple[int, float, np.ndarray | None]]],
    list[tuple[int, str]],
]:
    """Whole-track embeddings, segment queries {tau: [(item, offset_s, z)]} and failures."""
    from tqdm import tqdm

    sr = model.sample_rate
    max_samples = None if opts.max_seconds is None else round(opts.max_seconds * sr)
    draws = query_draws(opts, len(items))
    whole: list[np.ndarray | None] = [None] * len(items)
    queries: dict[float, list[tuple[int, float, np.ndarray | None]]] = {
        tau: [] for tau in opts.query_seconds
    }
    skipped: list[tuple[int, str]] = []
    bar = tqdm(total=len(items), desc="embed", unit="track", disable=not progress)

    def flush(chunk: list[tuple[int, torch.Tensor]]) -> None:
        inputs: list[torch.Tensor] = []
        slots: list[tuple[float | None, int, float]] = []  # (tau or None: whole track, item, s)
        for i, x in chunk:
            if embeddings is None:
                inputs.append(x)
                slots.append((None, i, 0.0))
            else:
                whole[i] = np.asarray(embeddings[i], dtype=np.float32)
            for tau in opts.query_seconds:
                length = round(tau * sr)
                for u in draws[tau][i]:
                    offset = clip_start(u, len(x), length)
                    inputs.append(x[offset : offset + length])
                    slots.append((tau, i, offset / sr))
        zs = model.embed_many(inputs, hop=opts.hop, batch_size=opts.batch_size)
        for (slot_tau, i, offset_s), z in zip(slots, zs, strict=False):
            if slot_tau is None:
                whole[i] = z
            else:
                queries[slot_tau].append((i, offset_s, z))
        bar.update(len(chunk))

    chunk: list[tuple[int, torch.Tensor]] = []
    for i, x in _decoded(model, items, waveforms, max_samples):
        if isinstance(x, str):
            skipped.append((i, x))
            bar.update(1)
            continue
        chunk.append((i, x))
        if len(chunk) == _CHUNK_TRACKS:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    bar.close()
    return whole, queries, skipped


# -- scoring ---------------------------------------------------------------------------------


def _padded(zs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of different segment counts -> (B, S, D) zero-padded and mask (True = pad)."""
    longest = max(len(z) for z in zs)
    dim = zs[0].shape[1]
    out = torch.zeros(len(zs), longest, dim)
    mask = torch.ones(len(zs), longest, dtype=torch.bool)
    for b, z in enumerate(zs):
        out[b, : len(z)] = torch.from_numpy(np.asarray(z, dtype=np.float32))
        mask[b, : len(z)] = False
    return out, mask


def distances(
    queries: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    reduction: str,
    device: str | torch.device,
    progress: bool,
    desc: str,
) -> np.ndarray:
    """(Q, C) track distances, computed on `device` in padded blocks to bound memory."""
    from tqdm import tqdm

    if any(np.ndim(z) != 2 or len(z) == 0 for z in (*queries, *cands)):
        raise ValueError("expected every embedding as an (S, D) array with S >= 1")
    dims = {z.shape[1] for z in (*queries, *cands)}
    if len(dims) > 1:
        raise ValueError(f"expected embeddings of one dimension, got dimensions {sorted(dims)}")
    out = np.empty((len(queries), len(cands)), dtype=np.float64)
    cand_blocks = [
        tuple(t.to(device) for t in _padded(cands[c : c + _CAND_BLOCK]))
        for c in range(0, len(cands), _CAND_BLOCK)
    ]
    starts = range(0, len(queries), _QUERY_BLOCK)
    bar = tqdm(starts, desc=f"score {desc}", unit="block", leave=False, disable=not progress)
    for start in bar:
        q, qmask = (t.to(device) for t in _padded(queries[start : start + _QUERY_BLOCK]))
        row = [track_distance(q, c, reduction, qmask, cmask) for c, cmask in cand_blocks]
        out[start : start + len(q)] = torch.cat(row, dim=1).cpu().numpy()
    return out
