"""A training-free pairwise baseline: Qmax cross-recurrence alignment of chroma sequences.

Serrà, Serra and Andrzejak (2009), "Cross recurrence quantification for cover song
identification". Each track becomes a sequence of 12-bin chroma frames folded from the same
CQT the network sees, averaged to `QmaxParams.frame_rate` frames per second and
delay-embedded (`m` frames `tau` apart). For a (query, candidate) pair:

1. the query is transposed by the optimal transposition index (OTI): the circular shift of
   its pitch classes that best matches the two tracks' global chroma profiles;
2. a binary cross-recurrence plot marks the frame pairs that are mutual nearest neighbours:
   each is among the other's `kappa` closest frames (cosine) in the other sequence;
3. Qmax is the length of the best alignment path through that plot, allowing knight moves
   (tempo deviations), with gap onset and extension penalties (librosa's ``rqa``).

The track distance is ``1 / (1 + Qmax)``. Within one query's row any decreasing function of
Qmax ranks alike, so normalising by the query's length changes nothing; normalising by the
candidate's (``sqrt(N) / Qmax``) moved MAP by less than 0.03 either way on two small checks
(36 FluidSynth versions of 12 works, 32 transposed/stretched synthetic versions of 8), so
the plain form is kept. On the first, embeddings of m = 3 and 5 frames ranked best (MAP
averaged over the track level and the 5/10/20/30 s clips: 0.56 and 0.55, against 0.45 for
m = 1 and 0.43 for m = 9, whose 4 s of context fill most of a 5 s clip); m = 5 is kept, as
kappa = 0.1, which beat 0.05 and 0.15.

Unlike `training.baseline.ChromaBaseline` there is no embedding: `QmaxScorer.embed_many`
returns chroma sequences and `QmaxScorer.distances` scores every pair, which
`refrain.training.evaluate` uses in place of its segment reductions. librosa's alignment
kernel (numba) keeps the GIL, so pairs are spread over processes; each track's chroma is
computed once.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from refrain.model.config import ModelConfig
from refrain.model.embedder import AudioInput, load_waveform

NAME = "qmax"
_TASKS_PER_WORKER = 32  # query chunks per worker process: balance and progress granularity
_POOL_MIN_CELLS = 50_000_000  # plot cells (~0.1 us each) worth starting processes (seconds)


def _librosa() -> ModuleType:
    try:
        import librosa.sequence
    except ImportError as e:
        raise ImportError(
            "the Qmax baseline needs librosa: pip install 'librosa>=0.10' "
            "(or pip install -e '.[train]')"
        ) from e
    return librosa


@dataclass(frozen=True)
class QmaxParams:
    """Chroma, recurrence and alignment settings: the paper's, but m (see the module doc)."""

    frame_rate: float = 2.0  # chroma frames per second, averaged from the CQT frames
    m: int = 5  # delay-embedding dimension (frames stacked per state)
    tau: int = 1  # delay between stacked frames, in frames
    kappa: float = 0.1  # fraction of the other sequence's frames that are neighbours
    gap_onset: float = 5.0  # penalty of a gap's first frame in the alignment
    gap_extend: float = 0.5  # penalty of each further gap frame
    # the chroma itself (`fold_chroma`): CQT bins from this one up (0: all, from C1) ...
    lowest_bin: int = 0
    power: float = 1.0  # ... with their magnitudes raised to this power before folding
    # or the tune's chroma instead: the pitch probabilities of the tune-salience network
    # (`refrain.model.salience`), folded to pitch classes (lowest_bin and power then unused)
    tune: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.frame_rate) and self.frame_rate > 0):
            raise ValueError(f"expected a positive frame_rate, got {self.frame_rate!r}")
        if self.m < 1 or self.tau < 1:
            raise ValueError(f"expected m >= 1 and tau >= 1, got {self.m!r} and {self.tau!r}")
        if not 0 < self.kappa <= 1:
            raise ValueError(f"expected 0 < kappa <= 1, got {self.kappa!r}")
        if self.gap_onset < 0 or self.gap_extend < 0:
            raise ValueError("expected non-negative gap penalties")
        if self.lowest_bin < 0:
            raise ValueError(f"expected lowest_bin >= 0, got {self.lowest_bin!r}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"expected a positive power, got {self.power!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.tune:  # as the settings read before the tune chroma existed
            del d["tune"]
        return {"name": NAME, **d, "distance": "1/(1+qmax)"}


# -- features --------------------------------------------------------------------------------


def fold_chroma(
    cqt: np.ndarray, per_frame: int, lowest_bin: int = 0, power: float = 1.0
) -> np.ndarray:
    """CQT magnitudes (bins, frames), bin 0 a C, 12 per octave -> chroma (n, 12).

    The bins from `lowest_bin` up (a multiple of 12 keeps whole octaves), their magnitudes
    raised to `power`, are summed per pitch class, frames averaged `per_frame` at a time (a
    shorter last group only if it holds half a group or more) and each frame scaled to a
    maximum of 1.
    """
    bins, frames = cqt.shape
    octaves = bins // 12
    x = cqt[: octaves * 12]
    if lowest_bin or power != 1.0:
        x = x.copy()
        x[: min(lowest_bin, len(x))] = 0
        if power != 1.0:
            x **= power
    chroma = x.reshape(octaves, 12, frames).sum(0)
    starts = np.arange(0, frames, per_frame)
    if len(starts) > 1 and frames - starts[-1] < per_frame / 2:
        starts = starts[:-1]
    counts = np.diff(np.append(starts, frames))
    pooled = np.add.reduceat(chroma, starts, axis=1) / counts
    pooled = pooled / np.maximum(pooled.max(0, keepdims=True), 1e-8)
    return np.ascontiguousarray(pooled.T, dtype=np.float32)


def chroma_of(
    cqt: np.ndarray, per_frame: int, params: QmaxParams, probs: np.ndarray | None = None
) -> np.ndarray:
    """The chroma `params` ask for, from CQT magnitudes (bins, frames) at the CQT's rate,
    `per_frame` CQT frames a chroma frame: `fold_chroma`, or with `params.tune` the tune's
    chroma (`refrain.model.salience.tune_chroma`) of `probs`, the shipped salience network's
    `frame_probabilities` of this CQT (computed here when None)."""
    if not params.tune:
        return fold_chroma(cqt, per_frame, params.lowest_bin, params.power)
    from .salience import frame_probabilities, tune_chroma

    return tune_chroma(frame_probabilities(cqt) if probs is None else probs, per_frame)


def delay_embed(chroma: np.ndarray, m: int, tau: int) -> np.ndarray:
    """(n, d) frames -> (n, d * m) states [x(t), x(t - tau), ...], the first frame repeated
    before the start so that a sequence keeps its length (short clips stay usable)."""
    n, d = chroma.shape
    out = np.empty((n, m, d), dtype=chroma.dtype)
    for k in range(m):  # slices, not a gather: the same values, a third of the time
        s = min(k * tau, n)
        out[s:, k] = chroma[: n - s]
        if s:  # an empty sequence has no first frame to repeat
            out[:s, k] = chroma[0]
    return out.reshape(n, m * d)


def _unit(x: np.ndarray) -> np.ndarray:
    # np.linalg.norm's own sum of squares for a real array, without its conjugate copy
    norm = np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, 1e-8)


def oti(query_profile: np.ndarray, cand_profiles: np.ndarray) -> np.ndarray:
    """Shift k (np.roll of the query's pitch axis) best matching each candidate's profile.

    Profiles are global chroma (12,) and (C, 12); returns (C,) ints in [0, 12).
    """
    rolled = np.stack([np.roll(query_profile, k) for k in range(12)])  # (12, 12)
    return np.argmax(rolled @ np.asarray(cand_profiles).T, axis=0)


def cross_recurrence(query: np.ndarray, cand: np.ndarray, kappa: float) -> np.ndarray:
    """Binary (n, m) plot of unit-norm states: True where query frame i is among the
    ``ceil(kappa * m)`` closest of the candidate's frames to it and candidate frame j among
    the ``ceil(kappa * n)`` closest of the query's (cosine). Exactly that many are taken, ties
    broken arbitrarily as in librosa's ``cross_similarity``: silence (all similarities equal)
    must not make a frame everyone's neighbour."""
    return mutual_neighbours(query @ cand.T, kappa)


def mutual_neighbours(sim: np.ndarray, kappa: float) -> np.ndarray:
    """`cross_recurrence`'s plot from similarities (..., n, m): leading axes are separate
    plots (the query in several keys against one candidate)."""
    n, m = sim.shape[-2:]
    k_row, k_col = max(1, math.ceil(kappa * m)), max(1, math.ceil(kappa * n))
    return _top(sim, k_row, -1) & _top(sim, k_col, -2)


def _top(sim: np.ndarray, k: int, axis: int) -> np.ndarray:
    """True at the `k` largest values along `axis`: those at or above the k-th largest (one
    partition, no index arrays), and where ties at that value would give more than k, the k
    that argpartition picks, exactly as before."""
    size = sim.shape[axis]
    if k >= size:
        return np.ones(sim.shape, dtype=bool)
    kth = np.take(np.partition(sim, size - k, axis=axis), [size - k], axis=axis)
    top = sim >= kth
    over = top.sum(axis=axis, keepdims=True) > k
    if over.any():  # ties at the threshold (silence): argpartition's k, lines that need it
        exact = np.zeros(sim.shape, dtype=bool)
        np.put_along_axis(
            exact,
            np.take(np.argpartition(-sim, k - 1, axis=axis), np.arange(k), axis=axis),
            True,
            axis=axis,
        )
        top = np.where(over, exact, top)
    return top


def qmax(recurrence: np.ndarray, gap_onset: float = 5.0, gap_extend: float = 0.5) -> float:
    """Length of the best local alignment path through a binary cross-recurrence plot."""
    rec = np.asarray(recurrence, dtype=np.float32)
    if rec.ndim != 2 or min(rec.shape) < 2:  # the kernel reads [1, 1] unchecked
        raise ValueError(f"expected a plot of at least 2 x 2 frames, got shape {rec.shape}")
    score = _librosa().sequence.rqa(  # floats: numba compiles once per argument type
        rec,
        gap_onset=float(gap_onset),
        gap_extend=float(gap_extend),
        knight_moves=True,
        backtrack=False,
    )
    return float(score.max())


class _Candidates:
    """Candidate states and profiles prepared once; scores query chroma against them all."""

    def __init__(self, cands: Sequence[np.ndarray], params: QmaxParams) -> None:
        self.params = params
        self.states = [_unit(delay_embed(c, params.m, params.tau)) for c in cands]
        self.profiles = np.stack([_unit(c.mean(0)) for c in cands])

    def qmax_row(self, query: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """Qmax of one query chroma (n, 12) against every candidate, or against the
        candidates `cols` only: (C,) or (len(cols),)."""
        p = self.params
        cols = np.arange(len(self.states)) if cols is None else np.asarray(cols, dtype=np.int64)
        shifts = oti(_unit(query.mean(0)), self.profiles[cols])
        rolled = {
            k: _unit(delay_embed(np.roll(query, k, axis=1), p.m, p.tau)) for k in np.unique(shifts)
        }
        return np.array(
            [
                qmax(
                    cross_recurrence(rolled[k], self.states[j], p.kappa), p.gap_onset, p.gap_extend
                )
                for k, j in zip(shifts, cols, strict=True)
            ]
        )


_WORKER: _Candidates | None = None


_BLAS = None


def one_blas_thread() -> AbstractContextManager[object]:
    """Single-threaded BLAS for the block: the products here are small, and BLAS threads that
    spin while other work holds the cores make them ten times slower (threadpoolctl; its
    controller is made once, a limit then costs some microseconds). Only BLAS libraries with
    their own threads are limited: an OpenMP-threaded one (FAISS's OpenBLAS) would take the
    calling thread's OpenMP setting with it, which FAISS's searches read."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        prefixes = [
            lib.prefix
            for lib in controller.lib_controllers
            if lib.user_api == "blas" and lib.info().get("threading_layer") != "openmp"
        ]
        _BLAS = controller.select(prefix=prefixes)
    return _BLAS.limit(limits=1)


def _init_worker(cands: Sequence[np.ndarray], params: QmaxParams) -> None:
    global _WORKER
    one_blas_thread()
    _WORKER = _Candidates(cands, params)


def _score_chunk(queries: list[np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.process_time()
    assert _WORKER is not None, "a pool worker is set up by _init_worker"
    rows = np.stack([_WORKER.qmax_row(q) for q in queries])
    return rows, time.process_time() - start


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PairCost:
    """What scoring the pairs of one evaluation cost."""

    scorer: str
    pairs: int
    wall_s: float
    cpu_s: float  # process time of the scoring, summed over worker processes
    workers: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "ms_per_pair": 1000 * self.wall_s / max(self.pairs, 1),
            "cpu_ms_per_pair": 1000 * self.cpu_s / max(self.pairs, 1),
        }


class QmaxScorer:
    """Qmax pair scoring with the audio interface of an `Embedder` (see the module doc)."""

    name = NAME

    def __init__(
        self,
        params: QmaxParams | None = None,
        config: ModelConfig | None = None,
        workers: int | None = None,
    ) -> None:
        from refrain.model.network import make_cqt
        from refrain.model.shingle import CroppedCQT

        _librosa()  # fail before any audio is decoded
        self.params = params or QmaxParams()
        self.config = config or ModelConfig()
        self.workers = available_cpus() if workers is None else workers
        if self.workers < 1:
            raise ValueError(f"expected at least one worker process, got {self.workers}")
        self._cqt = CroppedCQT(make_cqt(self.config)[0])
        self._per_frame = max(1, round(1 / (self.params.frame_rate * self.config.cqt.hoplen)))
        self.device = torch.device("cpu")
        self.identity = self.params

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def waveform(self, audio: AudioInput) -> torch.Tensor:
        return load_waveform(audio, self.sample_rate)  # same decoding and checks as the network

    @torch.inference_mode()
    def chroma(self, audio: AudioInput) -> np.ndarray:
        """Audio -> chroma sequence (n, 12) at `params.frame_rate`, n >= 2."""
        x = self.waveform(audio)
        if len(x) <= self._cqt.half_width:  # reflection padding needs more than half a kernel
            x = x.repeat(self._cqt.half_width // len(x) + 1)
        cqt = self._cqt(x.view(1, -1))[0].numpy()
        chroma = chroma_of(cqt, self._per_frame, self.params)
        return chroma if len(chroma) >= 2 else np.repeat(chroma, 2, axis=0)

    def embed_many(
        self, items: Iterable[AudioInput], hop: float = 5.0, batch_size: int = 32, **_: object
    ) -> list[np.ndarray]:
        """Chroma sequences of the items (`hop` and `batch_size` do not apply)."""
        return [self.chroma(item) for item in items]

    def distances(
        self,
        queries: Sequence[Sequence[np.ndarray]],
        cands: Sequence[np.ndarray],
        progress: bool = False,
    ) -> tuple[list[np.ndarray], PairCost]:
        """Distance matrices (Q_g, C) of each group of query chroma against all candidates.

        All groups share one process pool of `workers` processes, started only when there
        are enough pairs to repay its start (each process imports torch); otherwise, and with
        one worker, pairs are scored in this process.
        """
        from tqdm import tqdm

        flat = [q for group in queries for q in group]
        if any(np.ndim(z) != 2 or np.shape(z)[1] != 12 or len(z) < 2 for z in (*flat, *cands)):
            raise ValueError("expected chroma sequences as (n, 12) arrays with n >= 2")
        start = time.perf_counter()
        qmaxes = np.empty((len(flat), len(cands)))
        size = max(1, math.ceil(len(flat) / (self.workers * _TASKS_PER_WORKER)))
        chunks = [range(i, min(i + size, len(flat))) for i in range(0, len(flat), size)]
        bar = tqdm(
            total=len(flat) * len(cands),
            desc=self.name,
            unit="pair",
            unit_scale=True,
            leave=False,
            disable=not progress,
        )
        cpu = 0.0
        cells = sum(len(q) for q in flat) * sum(len(c) for c in cands)
        workers = 1 if cells < _POOL_MIN_CELLS else min(self.workers, len(chunks))
        if workers <= 1:
            scorer = _Candidates(cands, self.params)
            with one_blas_thread():
                for chunk in chunks:
                    t = time.process_time()
                    qmaxes[chunk.start : chunk.stop] = [scorer.qmax_row(flat[i]) for i in chunk]
                    cpu += time.process_time() - t
                    bar.update(len(chunk) * len(cands))
        else:
            # spawn: the parent holds torch's threads, which fork must not copy
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, context, _init_worker, (list(cands), self.params)
            ) as pool:
                futures = {pool.submit(_score_chunk, [flat[i] for i in c]): c for c in chunks}
                for future in as_completed(futures):
                    chunk = futures[future]
                    rows, seconds = future.result()
                    qmaxes[chunk.start : chunk.stop] = rows
                    cpu += seconds
                    bar.update(len(chunk) * len(cands))
        bar.close()
        dist = 1.0 / (1.0 + qmaxes)
        out, at = [], 0
        for group in queries:
            out.append(dist[at : at + len(group)])
            at += len(group)
        cost = PairCost(self.name, qmaxes.size, time.perf_counter() - start, cpu, max(workers, 1))
        return out, cost


def shortlist_qmax(
    queries: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    shortlists: Sequence[np.ndarray],
    params: QmaxParams | None = None,
    progress: bool = False,
) -> tuple[list[np.ndarray], PairCost]:
    """Qmax of each query chroma against its shortlisted candidates only (`shortlists[i]`:
    columns of `cands`), as the service's verification scores them: one batched alignment
    per query (`refrain.model.align.plots`, local OTI), in this process."""
    from tqdm import tqdm

    from refrain.model.align import plots

    start, cpu = time.perf_counter(), time.process_time()
    out = []
    with one_blas_thread():
        for q, cols in tqdm(
            list(zip(queries, shortlists, strict=True)),
            desc="verify",
            unit="query",
            leave=False,
            disable=not progress,
        ):
            out.append(plots(q, [cands[j] for j in cols], params).qmax())
    pairs = sum(len(cols) for cols in shortlists)
    cost = PairCost("verify", pairs, time.perf_counter() - start, time.process_time() - cpu, 1)
    return out, cost


def qmax_pair(query: np.ndarray, cand: np.ndarray, params: QmaxParams | None = None) -> float:
    """Qmax of two chroma sequences (n, 12) and (m, 12), the query transposed by OTI."""
    return float(_Candidates([cand], params or QmaxParams()).qmax_row(query)[0])
