"""The data of bench/search.py: seeded segment embeddings and chroma sequences of N reference
tracks and their queries, regenerated per batch, and the exhaustive ground truth they are
measured against (`exhaustive_rank`, and with verification the same pipeline on exact search).

Three kinds (bench/search.py's docstring says what each stands for): random, clustered and
model (the covariances of the shipped model's embeddings, bench/data/embedding-stats.npz).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refrain.index import SegmentIndex
from refrain.model.reduce import nsqeuc
from refrain.model.sequence import QueryChroma
from refrain.search.ranking import (
    QuerySegments,
    SearchOptions,
    exhaustive_rank,
    expand_with_first,
)
from refrain.search.verification import Verification

SEGMENTS = 40  # segments per reference track
HOP_S = 5.0  # reference and query hop
QUERY_S = 30.0  # query clip length
QUERY_SEGMENTS = 3  # segments of a 30 s clip at a 5 s hop
BATCH = 1000  # tracks generated (and ingested) at a time
TOP = 10
GIB = 1 << 30
DATASETS = ("random", "clustered", "model")
STATS = Path(__file__).resolve().parent / "data" / "embedding-stats.npz"


# -- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Seeded reference vectors, regenerated on demand one batch of tracks at a time."""

    kind: str  # "random" or "clustered"
    n_tracks: int
    zdim: int
    dtype: str  # the store's vector dtype; the ground truth sees the same rounding
    seed: int = 0
    stats: Path = STATS  # covariances of the "model" kind
    works: np.ndarray = field(init=False, repr=False)  # work of each track (clustered, model)
    centres: np.ndarray = field(init=False, repr=False)
    factors: dict = field(init=False, repr=False)  # version, segment and noise factors (model)

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.kind!r}")
        rng = np.random.default_rng([self.seed, 1])
        n_works = max(1, self.n_tracks // 4)
        object.__setattr__(self, "works", rng.integers(0, n_works, self.n_tracks))
        centres = rng.standard_normal((n_works, self.zdim), dtype=np.float32)
        factors = {}
        if self.kind == "model":
            stats = np.load(self.stats)
            if len(stats["mean"]) != self.zdim:
                raise SystemExit(
                    f"{self.stats} describes zdim {len(stats['mean'])}, not "
                    f"{self.zdim}: rerun bench/embedding_stats.py"
                )
            factors = {
                p: stats[f"{p}_factor"].astype(np.float32).T for p in ("work", "version", "segment")
            }
            centres = centres @ factors["work"] + stats["mean"]
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "factors", factors)

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_tracks / BATCH)

    def batch(self, b: int) -> np.ndarray:
        """Tracks b*BATCH .. as stored: (n, SEGMENTS, zdim) float32 (rounded to the dtype)."""
        lo, hi = b * BATCH, min(self.n_tracks, (b + 1) * BATCH)
        rng = np.random.default_rng([self.seed, 2, b])
        shape = (hi - lo, SEGMENTS, self.zdim)
        x = rng.standard_normal(shape, dtype=np.float32)
        if self.kind == "clustered":
            x *= 0.5  # the segment's own variation
            x += 0.5 * rng.standard_normal((hi - lo, 1, self.zdim), dtype=np.float32)  # version
            x += self.centres[self.works[lo:hi]][:, None, :]  # the work
        elif self.kind == "model":
            x = x @ self.factors["segment"]
            x += (
                rng.standard_normal((hi - lo, 1, self.zdim), dtype=np.float32)
                @ self.factors["version"]
            )
            x += self.centres[self.works[lo:hi]][:, None, :]
        return x.astype(self.dtype).astype(np.float32)

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        for b in range(self.n_batches):
            yield b * BATCH, self.batch(b)

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, QUERY_SEGMENTS, zdim) noisy copies of consecutive stored segments, and the
        track each was copied from."""
        rng = np.random.default_rng([self.seed, 3])
        sources = rng.choice(self.n_tracks, size=min(n, self.n_tracks), replace=False)
        offsets = rng.integers(0, SEGMENTS - QUERY_SEGMENTS + 1, len(sources))
        out = np.empty((len(sources), QUERY_SEGMENTS, self.zdim), dtype=np.float32)
        for b in np.unique(sources // BATCH):
            x = self.batch(int(b))
            for i in np.flatnonzero(sources // BATCH == b):
                o = offsets[i]
                out[i] = x[sources[i] % BATCH, o : o + QUERY_SEGMENTS]
        noise = 0.5 * rng.standard_normal(out.shape, dtype=np.float32)
        if self.kind == "model":  # half the spread of a track's own segments
            noise = noise @ self.factors["segment"]
        out += noise
        return out, sources


def track_id(i: int) -> str:
    return f"t{i:07d}"


TRACK_S = (SEGMENTS - 1) * HOP_S + 20.0


def track_chroma(seed: int, i: int) -> np.ndarray:
    """Track i's chroma sequence: a random walk over pitch classes at SEQUENCE_RATE."""
    from refrain.model.sequence import SEQUENCE_RATE

    rng = np.random.default_rng([seed, 7, i])
    n = int(TRACK_S * SEQUENCE_RATE)
    x = np.abs(np.cumsum(0.4 * rng.standard_normal((n, 12)), axis=0)) + rng.random((n, 12))
    return (x / x.max(1, keepdims=True)).astype(np.float32)


def query_chroma(seed: int, source: int, n: int) -> QueryChroma:
    """A 30 s query's sequences: its source's chroma at a seeded offset, with noise (the same
    frames serve as its upper chroma, as they do in each stored sequence)."""
    from refrain.model.sequence import FINE_RATE, SEQUENCE_RATE

    rng = np.random.default_rng([seed, 8, n])
    ref = track_chroma(seed, source)
    m = int(QUERY_S * SEQUENCE_RATE)
    o = int(rng.integers(0, len(ref) - m + 1))
    coarse = np.clip(ref[o : o + m] + 0.1 * rng.random((m, 12)), 0, None)
    fine = np.repeat(coarse, int(FINE_RATE / SEQUENCE_RATE), axis=0)
    coarse = coarse / coarse.max(1, keepdims=True)
    return QueryChroma(coarse, fine, coarse)


def verified_top(
    index: SegmentIndex,
    gt_d: np.ndarray,
    gt_i: np.ndarray,
    chroma: QueryChroma,
    opts: SearchOptions,
) -> set[str]:
    """The exhaustive pipeline's top 10 with verification: the `opts.verify` exhaustive
    nearest tracks aligned, fused and expanded as `rank_tracks` does, the rest in distance
    order."""
    ids = [track_id(int(i)) for i in gt_i]
    v = Verification(
        index,
        ids,
        [float(d) for d in gt_d],
        chroma.chroma,
        chroma.fine,
        opts.fusion(),
        chroma.upper,
    )
    found, vectors, _, offsets = index.gather_vectors(v.ids)
    expand_with_first(v, found, vectors, offsets)
    return set(v.reorder(ids)[:TOP])


def ground_truth(
    ds: Dataset, queries: np.ndarray, depth: int = TOP
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive `min` ranking over every track: (q, depth) distances and track numbers."""
    q = torch.from_numpy(queries.reshape(-1, ds.zdim))
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for first, x in ds.batches():
        d = nsqeuc(q, torch.from_numpy(x.reshape(-1, ds.zdim)))
        d = d.reshape(len(queries), QUERY_SEGMENTS, len(x), SEGMENTS).amin(dim=(1, 3)).numpy()
        cat_d = np.concatenate([best_d, d], axis=1)
        cat_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(first, first + len(x)), d.shape)], axis=1
        )
        order = np.lexsort((cat_i, cat_d), axis=1)[:, :depth]  # distance, then track id
        best_d = np.take_along_axis(cat_d, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
    return best_d, best_i


def query_segments(
    vectors: np.ndarray, segment_s: float, chroma: QueryChroma | None = None
) -> QuerySegments:
    starts = np.arange(QUERY_SEGMENTS, dtype=np.float64) * HOP_S
    if chroma is None:
        return QuerySegments(vectors, starts, segment_s, QUERY_S)
    return QuerySegments(
        vectors,
        starts,
        segment_s,
        QUERY_S,
        chroma=chroma.chroma,
        fine=chroma.fine,
        upper=chroma.upper,
    )


def verify_ground_truth(
    index: SegmentIndex, queries: np.ndarray, gt_d: np.ndarray, gt_i: np.ndarray, segment_s: float
) -> None:
    """The vectorised ground truth must equal `exhaustive_rank` (the library's own)."""
    for q, d, i in zip(queries, gt_d, gt_i, strict=True):
        ref = exhaustive_rank(index, query_segments(q, segment_s), "min", TOP)
        ids = [t for t, _ in ref]
        if ids != [track_id(int(k)) for k in i] or not np.allclose(
            [x for _, x in ref], d, rtol=1e-4, atol=1e-6
        ):
            raise SystemExit(
                f"ground truth disagrees with exhaustive_rank: {ref} vs "
                f"{list(zip(map(track_id, i), d, strict=True))}"
            )
