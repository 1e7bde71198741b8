"""What a running service holds (model, index, worker, jobs) and the operations routes call."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import faiss
import numpy as np
import torch

from index import AddResult, IndexOptions, SegmentIndex, TrackRecord, open_index
from index.search import QuerySegments, SearchOptions, TrackHit, key_shifts, rank_tracks
from model.audio import load_audio
from model.calibrate import Calibration, uncalibrated_score
from model.embedder import Embedder, check_embeddings, load_model
from service.errors import ApiError
from service.metrics import Metrics
from service.remote_worker import RemoteWorkers
from service.settings import Settings
from service.storage import SpaceGuard, index_write_bytes, segment_count
from service.worker import InferenceWorker

log = logging.getLogger("refrain.service")


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: Embedder | None = None
        self.index: SegmentIndex | None = None
        self.worker: InferenceWorker | RemoteWorkers | None = None
        self.jobs: Any = None
        self.score: Callable[[float], float] = uncalibrated_score
        self.load_error: str | None = None
        self._ready = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, open the index, start the worker and resume jobs (blocking)."""
        s = self.settings
        try:
            # with remote workers the model here only decodes and describes: no GPU needed
            gpu = torch.cuda.is_available() and not s.worker_list
            device = s.device or ("cuda" if gpu else "cpu")
            self.model = load_model(s.model, device=device)
            calibration = self.model.info.get("calibration")
            if calibration:
                self.score = Calibration.from_dict(calibration).probability
            s.data_dir.mkdir(parents=True, exist_ok=True)
            self.index = self._open_index()
            self.worker = self._start_worker()
            from service.jobs import JobManager

            self.jobs = JobManager(self)
            self.jobs.start()
            self.refresh_index_metrics()
            self._ready.set()
            self.metrics.ready.set(1)
            log.info("ready: model %s, %d tracks", self.model.identity.weights_sha256[:12],
                     len(self.index))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("failed to start: %s", self.load_error)
            raise

    # -- deployed shape: index backend (settings.index_backend) and remote workers -----------

    def _open_index(self) -> SegmentIndex:
        s = self.settings
        options = IndexOptions(vector_dtype=s.vector_dtype,
                               search_params=s.index_search_params or None)
        if s.index_backend == "milvus":
            from index.milvus import MilvusOptions, open_milvus_index

            milvus = MilvusOptions(uri=s.milvus_uri or None, token=s.milvus_token,
                                   collection=s.milvus_collection,
                                   index_type=s.milvus_index_type)
            return open_milvus_index(s.index_dir, self.identity(), milvus, options=options)
        return open_index(s.index_dir, self.identity(), factory=s.index_factory, options=options)

    def _start_worker(self) -> InferenceWorker | RemoteWorkers:
        s = self.settings
        if s.worker_list:
            assert self.index is not None
            # every worker must serve the model the index was built with (hop is per request)
            wanted = {k: v for k, v in self.index.identity.items() if k != "hop_s"}
            return RemoteWorkers(s.worker_list, wanted, self.metrics, token=s.worker_token,
                                 timeout_s=s.worker_timeout_s, max_in_flight=s.max_queue)
        return InferenceWorker(
            self.model, self.metrics, max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
        )

    def close(self) -> None:
        self._ready.clear()
        self.metrics.ready.set(0)
        if self.jobs is not None:
            self.jobs.stop()
        if self.worker is not None:
            self.worker.close()
        if self.index is not None:
            self.index.close()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def require_ready(self) -> None:
        if not self.ready:
            why = f" ({self.load_error})" if self.load_error else " (loading model and index)"
            raise ApiError(503, "not_ready", f"service is not ready{why}", {"Retry-After": "5"})

    def identity(self) -> dict[str, Any]:
        assert self.model is not None
        return {**self.model.identity.to_dict(), "hop_s": self.settings.reference_hop_s}

    def refresh_index_metrics(self) -> None:
        if self.index is None:
            return
        st = self.index.stats()
        self.metrics.index_tracks.set(st.tracks)
        self.metrics.index_segments.set(st.segments)
        self.metrics.index_bytes.set(st.bytes_on_disk)

    # -- audio ---------------------------------------------------------------------------------

    def decode(self, data: bytes, max_s: float, min_s: float = 0.0) -> np.ndarray:
        """Bytes -> validated 16 kHz mono waveform (typed errors for bad audio)."""
        assert self.model is not None
        wave = load_audio(data, sample_rate=self.model.sample_rate, max_duration_s=max_s)
        seconds = len(wave) / self.model.sample_rate
        self.metrics.audio_decoded.inc(seconds)
        if seconds < min_s:
            raise ApiError(422, "audio_too_short",
                           f"expected at least {min_s:g} s of audio, got {seconds:.2f} s")
        rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
        if rms < self.settings.silence_rms:
            raise ApiError(422, "audio_silent",
                           f"the audio is silent (RMS {rms:.1e} below {self.settings.silence_rms:g})")
        return wave

    def require_space_for(self, duration_s: float) -> None:
        """507 unless the index write of a reference of `duration_s` fits on the data volume
        with the reserve left: checked before embedding, so nothing is written on refusal."""
        assert self.model is not None
        s = self.settings
        n = segment_count(duration_s, self.model.config.shingling.len, s.reference_hop_s)
        SpaceGuard(s.data_dir, s.min_free_bytes).require(
            index_write_bytes(n, self.model.zdim), f"the index write of {n} segments"
        )

    def index_failure(self) -> str | None:
        """Why the open index cannot serve every request (None: it can); see /readyz."""
        return getattr(self.index, "failure", None) if self.index is not None else None

    def embed(
        self, wave: np.ndarray, hop_s: float, shifts: tuple[int, ...] = (0,)
    ) -> tuple[np.ndarray, np.ndarray]:
        """(len(shifts) * S, zdim) vectors and the S segment starts."""
        assert self.worker is not None
        z = check_embeddings(self.worker.embed(wave, hop_s, shifts=shifts))  # local or remote
        return z, np.arange(len(z) // len(shifts), dtype=np.float64) * hop_s

    # -- operations ----------------------------------------------------------------------------

    def add_reference(
        self, data: bytes, meta: dict[str, Any], replace: bool = False
    ) -> tuple[AddResult, TrackRecord]:
        """Decode, embed and store one reference track; idempotent on (track_id, content)."""
        self.require_ready()
        assert self.index is not None
        digest = hashlib.sha256(data).hexdigest()
        track_id = meta["track_id"]
        existing = self.index.get_track(track_id)
        if existing is not None and existing.content_sha256 == digest:
            return AddResult.UNCHANGED, existing
        if existing is not None and not replace:
            raise ApiError(409, "track_exists",
                           f"track {track_id!r} exists with other content; send replace=true")
        wave = self.decode(data, self.settings.max_reference_s, min_s=0.5)
        self.require_space_for(len(wave) / self.model.sample_rate)
        z, starts = self.embed(wave, self.settings.reference_hop_s)
        record = reference_record(meta, len(wave), self.model.sample_rate, digest)
        result = self.index.add_track(record, z, starts, replace=replace)
        self.refresh_index_metrics()
        return result, self.index.get_track(track_id) or record

    def search(
        self, data: bytes, top_k: int, reduction: str | None, hop_s: float | None,
        transpositions: int | None = None,
    ) -> dict[str, Any]:
        """Rank the references for one query clip. `transpositions`: also try the clip
        shifted by up to this many semitones each way (None: the configured default)."""
        self.require_ready()
        assert self.model is not None and self.index is not None
        timings: dict[str, float] = {}
        t = time.perf_counter()
        wave = self.decode(data, self.settings.max_query_s, self.settings.min_query_s)
        timings["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        hop = hop_s or self.settings.query_hop_s
        if transpositions is None:
            transpositions = self.settings.query_transpositions
        shifts = key_shifts(transpositions)
        z, starts = self.embed(wave, hop, shifts)
        timings["embed"] = time.perf_counter() - t
        duration = len(wave) / self.model.sample_rate
        query = QuerySegments(z, starts, self.model.config.shingling.len, duration, shifts)
        opts = SearchOptions(top_k=top_k, k=self.settings.knn_k,
                             candidates=max(self.settings.candidates, top_k), reduction=reduction)
        with omp_threads(self.settings.search_threads):
            hits = rank_tracks(self.index, query, opts, score=self.score, timings=timings)
        self.metrics.knn_latency.observe(timings["search"])
        self.metrics.reduce_latency.observe(timings["reduce"])
        return {
            "results": [hit_json(h) for h in hits],
            "query_duration_s": round(duration, 3),
            "timings_ms": {k: round(v * 1000, 2) for k, v in timings.items()},
        }


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP thread count for the block; 0 leaves the OpenMP default.

    OpenMP keeps this count per calling thread, so setting it once at start-up would not
    reach the request threads: it is set around each search and restored after it. On a busy
    small CPU, one thread per query beats queries fighting over every core."""
    if n <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def reference_record(
    meta: dict[str, Any], n_samples: int, sample_rate: int, digest: str
) -> TrackRecord:
    """The stored record of a reference track; the service and `refrain index build` share it
    so that an index built offline stays idempotent under later ingestion."""
    return TrackRecord(
        track_id=meta["track_id"], title=meta.get("title") or "", artist=meta.get("artist") or "",
        work_id=meta.get("work_id") or None, duration_s=round(n_samples / sample_rate, 3),
        content_sha256=digest,
    )


def hit_json(hit: TrackHit) -> dict[str, Any]:
    t = hit.track
    return {
        "track_id": t.track_id, "title": t.title, "artist": t.artist, "work_id": t.work_id,
        "score": round(hit.score, 6), "distance": hit.distance,
        "matches": [asdict(m) for m in hit.matches], "transposition": hit.transposition,
    }
