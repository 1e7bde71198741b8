"""The application core: references in, clips searched, one ingestion item at a time.

`Engine` speaks no HTTP. It takes bytes and typed requests, returns typed results (`schemas`
encodes them as the API answers them), and raises the domain errors of `errors` (too short,
conflict, not found, insufficient storage...).
The routes, the ingestion jobs and `refrain index build` all call it, so the rules for adding
a reference (idempotent on track id and content, the audio checks, the stored record) are
written once, here.

    engine = Engine(settings, model, store, worker, metrics)
    result, track = engine.add_reference(audio_bytes, TrackMeta("t1", title="Song"))
    found = engine.search(SearchRequest(clip_bytes, top_k=5))
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import faiss
import numpy as np

from refrain.index import AddResult, SegmentStore, TrackRecord
from refrain.model.audio import load_audio
from refrain.model.calibration import uncalibrated_score
from refrain.model.embedder import Embedder, check_embeddings
from refrain.model.reduce import Reduction
from refrain.model.sequence import Chromagram
from refrain.search.ranking import QuerySegments, SearchOptions, TrackHit, key_shifts, rank_tracks
from refrain.service.errors import Conflict, Forbidden, InvalidInput, NotFound, TooLarge
from refrain.service.metrics import Metrics
from refrain.service.settings import Settings
from refrain.service.sources import Item
from refrain.service.storage import SpaceGuard, index_write_bytes, segment_count

MAX_TOP_K = 1000  # the default of REFRAIN_MAX_TOP_K
MIN_REFERENCE_S = 0.5
# Clips shorter than this find little (the model card: 5 s is the shortest clip evaluated,
# and 10 s or more match much better); they are searched, with a warning.
RELIABLE_QUERY_S = 5.0


class SegmentEmbedder(Protocol):
    """Turns a waveform into segment vectors: the in-process worker or the remote workers."""

    @property
    def depth(self) -> int: ...  # requests waiting or in flight

    def embed(
        self,
        wave: np.ndarray,
        hop_s: float,
        timeout: float | None = None,
        shifts: Sequence[int] = (0,),
    ) -> np.ndarray: ...  # (len(shifts) * S, zdim) float32

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackMeta:
    """What a caller says about a reference; the engine adds duration and content hash."""

    track_id: str
    title: str = ""
    artist: str = ""
    work_id: str | None = None


@dataclass(frozen=True)
class SearchRequest:
    audio: bytes
    top_k: int = 10
    reduction: str | None = None  # None: chosen by the clip's duration
    hop_s: float | None = None  # None: the configured query hop
    transpositions: int | None = None  # None: the configured default
    verify: bool = True  # alignment verification, where the settings enable it
    tune: bool = False  # aligned hits carry the aligned tune of clip and reference

    def check(self, max_top_k: int = MAX_TOP_K) -> None:
        if not 1 <= self.top_k <= max_top_k:
            raise InvalidInput(
                "invalid_parameter", f"top_k must be in 1..{max_top_k}, got {self.top_k}"
            )
        if self.reduction:
            try:
                Reduction.parse(self.reduction)
            except ValueError as e:
                raise InvalidInput("unknown_reduction", str(e)) from None
        if self.hop_s is not None and not 0.5 <= self.hop_s <= 20:
            raise InvalidInput(
                "invalid_parameter", f"hop must be in 0.5..20 seconds, got {self.hop_s}"
            )
        if self.transpositions is not None and not 0 <= self.transpositions <= 6:
            raise InvalidInput(
                "invalid_parameter",
                f"transpositions must be in 0..6 semitones, got {self.transpositions}",
            )


@dataclass(frozen=True)
class ClipWarning:
    """Something about a clip that makes its answer less reliable; the search still runs."""

    code: str
    message: str


@dataclass(frozen=True)
class SearchResult:
    hits: list[TrackHit]  # best first
    query_duration_s: float  # of the decoded clip
    timings_s: dict[str, float]  # seconds per stage, in the order the stages ran
    warnings: tuple[ClipWarning, ...] = ()


def clip_warnings(duration_s: float) -> tuple[ClipWarning, ...]:
    """What to tell the caller about a clip of `duration_s` that was searched. A clip is
    matched whole: one longer than REFRAIN_MAX_QUERY_S is refused (audio_too_long), never
    cut, so length only matters at the short end."""
    if duration_s < RELIABLE_QUERY_S:
        return (
            ClipWarning(
                "short_clip",
                f"the clip is {duration_s:.1f} s long; clips under {RELIABLE_QUERY_S:g} s "
                "find few versions (10 s or more match best): send a longer clip if you can",
            ),
        )
    return ()


@dataclass
class CheckedReference:
    """A reference that passed the checks: new audio to embed, or the stored unchanged track."""

    digest: str
    wave: np.ndarray | None = None
    unchanged: TrackRecord | None = None


class Engine:
    def __init__(
        self,
        settings: Settings,
        model: Embedder,
        store: SegmentStore,
        embedder: SegmentEmbedder | None,
        metrics: Metrics,
        score: Callable[[float], float] = uncalibrated_score,
        fused_score: Callable[[float, float, float], float] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.embedder = embedder  # None: decode and check only (`refrain index build`)
        self.metrics = metrics
        self.score = score
        # (distance, Qmax per query frame, its standard score among the candidates) ->
        # probability, for the tracks verification aligned
        self.fused_score = fused_score

    @functools.cached_property
    def chromagram(self) -> Chromagram:
        """Chroma sequences for alignment verification, from the model's CQT settings."""
        return Chromagram(self.model.config)

    def reference_sequence(self, wave: np.ndarray) -> bytes:
        with same_omp_threads():
            return self.chromagram.reference(wave)

    # -- audio ---------------------------------------------------------------------------------

    def decode(
        self, data: bytes, max_s: float, min_s: float = 0.0, complete: bool = False
    ) -> np.ndarray:
        """Bytes -> a validated waveform at the model's rate (InvalidInput for bad audio;
        with `complete`, also for a stream that ends short of its declared length)."""
        wave = load_audio(
            data, sample_rate=self.model.sample_rate, max_duration_s=max_s, complete=complete
        )
        seconds = len(wave) / self.model.sample_rate
        self.metrics.audio_decoded.inc(seconds)
        if seconds < min_s:
            raise InvalidInput(
                "audio_too_short", f"expected at least {min_s:g} s of audio, got {seconds:.2f} s"
            )
        rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
        if rms < self.settings.silence_rms:
            raise InvalidInput(
                "audio_silent",
                f"the audio is silent (RMS {rms:.1e} below {self.settings.silence_rms:g})",
            )
        return wave

    def embed(
        self, wave: np.ndarray, hop_s: float, shifts: tuple[int, ...] = (0,)
    ) -> tuple[np.ndarray, np.ndarray]:
        """(len(shifts) * S, zdim) vectors and the S segment starts."""
        assert self.embedder is not None, "this engine only checks audio"
        z = check_embeddings(self.embedder.embed(wave, hop_s, shifts=shifts))
        return z, np.arange(len(z) // len(shifts), dtype=np.float64) * hop_s

    def require_space_for(self, duration_s: float) -> None:
        """InsufficientStorage unless the index write of a reference of `duration_s` fits on
        the data volume with the reserve left: checked before embedding, so nothing is
        written on refusal."""
        s = self.settings
        n = segment_count(duration_s, self.model.config.shingling.len, s.reference_hop_s)
        SpaceGuard(s.data_dir, s.min_free_bytes).require(
            index_write_bytes(n, self.model.zdim, duration_s), f"the index write of {n} segments"
        )

    # -- references ----------------------------------------------------------------------------

    def check_reference(self, data: bytes, track_id: str, replace: bool) -> CheckedReference:
        """The rules for adding a reference: the same audio again is unchanged, other audio
        under a stored id needs `replace`, and the audio must decode to at least 0.5 s."""
        digest = hashlib.sha256(data).hexdigest()
        existing = self.store.get_track(track_id)
        if existing is not None and existing.content_sha256 == digest:
            return CheckedReference(digest, unchanged=existing)
        if existing is not None and not replace:
            raise Conflict(
                "track_exists", f"track {track_id!r} exists with other content; send replace=true"
            )
        wave = self.decode(
            data, self.settings.max_reference_s, min_s=MIN_REFERENCE_S, complete=True
        )
        return CheckedReference(digest, wave=wave)

    def record(self, meta: TrackMeta, checked: CheckedReference) -> TrackRecord:
        """The stored record of a checked reference; `refrain index build` writes the same, so
        an index built offline stays idempotent under later ingestion."""
        assert checked.wave is not None
        return TrackRecord(
            track_id=meta.track_id,
            title=meta.title or "",
            artist=meta.artist or "",
            work_id=meta.work_id or None,
            duration_s=round(len(checked.wave) / self.model.sample_rate, 3),
            content_sha256=checked.digest,
            sequence=self.reference_sequence(checked.wave),
        )

    def add_reference(
        self, data: bytes, meta: TrackMeta, replace: bool = False
    ) -> tuple[AddResult, TrackRecord]:
        """Decode, embed and store one reference track; idempotent on (track_id, content)."""
        checked = self.check_reference(data, meta.track_id, replace)
        if checked.unchanged is not None:
            return AddResult.UNCHANGED, checked.unchanged
        assert checked.wave is not None
        self.require_space_for(len(checked.wave) / self.model.sample_rate)
        z, starts = self.embed(checked.wave, self.settings.reference_hop_s)
        record = self.record(meta, checked)
        result = self.store.add_track(record, z, starts, replace=replace)
        self.refresh_metrics()
        return result, self.store.get_track(meta.track_id) or record

    def ingest_item(self, item: Item, replace: bool) -> AddResult:
        """One ingestion item: its file read (with the per-file limit) and added."""
        data = self.read_item(item)
        meta = TrackMeta(item.track_id, item.title, item.artist, item.work_id)
        return self.add_reference(data, meta, replace=replace)[0]

    def read_item(self, item: Item) -> bytes:
        """An item's bytes. A file read in place (ingested by path) must, once open, be the
        file its path resolves to inside the import root: one swapped for a link to
        elsewhere after the job was accepted is refused (links within the root still work)."""
        limit = self.settings.max_upload_bytes
        try:
            fd = os.open(item.path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                if not item.owned:
                    self._check_inside_root(item, f.fileno())
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise TooLarge(
                        "file_too_large", f"{item.filename} has {size} bytes, at most {limit}"
                    )
                return f.read()
        except FileNotFoundError:
            raise InvalidInput("file_missing", f"{item.filename} no longer exists") from None
        except OSError as e:
            raise InvalidInput("file_unreadable", f"cannot read {item.filename}: {e}") from None

    def _check_inside_root(self, item: Item, fd: int) -> None:
        root = self.settings.import_root
        if root is None:
            return
        real = item.path.resolve()
        if not real.is_relative_to(root.resolve()):
            raise Forbidden(
                "path_forbidden", f"{item.filename} now resolves outside the import root; not read"
            )
        opened, found = os.fstat(fd), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
            raise Forbidden("path_forbidden", f"{item.filename} changed as it was opened; not read")

    def get_track(self, track_id: str) -> TrackRecord:
        track = self.store.get_track(track_id)
        if track is None:
            raise NotFound("track_not_found", f"no track {track_id!r}")
        return track

    def delete_track(self, track_id: str) -> None:
        if not self.store.delete_track(track_id):
            raise NotFound("track_not_found", f"no track {track_id!r}")
        self.refresh_metrics()

    def list_tracks(
        self, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[TrackRecord], str | None]:
        return self.store.list_tracks(limit, cursor)

    def refresh_metrics(self) -> None:
        st = self.store.stats()
        self.metrics.index_tracks.set(st.tracks)
        self.metrics.index_segments.set(st.segments)
        self.metrics.index_bytes.set(st.bytes_on_disk)

    # -- search --------------------------------------------------------------------------------

    def search(self, request: SearchRequest) -> SearchResult:
        """Rank the references for one query clip."""
        s = self.settings
        request.check(s.max_top_k)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        wave = self.decode(request.audio, s.max_query_s, s.min_query_s)
        timings["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        hop = request.hop_s or s.query_hop_s
        transpositions = request.transpositions
        shifts = key_shifts(s.query_transpositions if transpositions is None else transpositions)
        z, starts = self.embed(wave, hop, shifts)
        timings["embed"] = time.perf_counter() - t
        duration = len(wave) / self.model.sample_rate
        verify = s.verify_candidates if request.verify else 0
        query = QuerySegments(z, starts, self.model.config.shingling.len, duration, shifts)
        if verify:
            t = time.perf_counter()
            with same_omp_threads():
                c = self.chromagram.query(wave)
            query = replace(
                query,
                chroma=c.chroma,
                fine=c.fine,
                upper=c.upper,
                tune=c.tune,
                contour=c.contour,
            )
            timings["chroma"] = time.perf_counter() - t
        opts = SearchOptions(
            top_k=request.top_k,
            k=s.knn_k,
            candidates=max(s.candidates, request.top_k, verify),
            reduction=request.reduction or None,
            verify=verify,
            verify_weight=s.verify_weight,
            verify_expand=s.verify_expand,
            tune=request.tune,
        )
        with omp_threads(s.search_threads):
            hits = rank_tracks(
                self.store,
                query,
                opts,
                score=self.score,
                timings=timings,
                fused_score=self.fused_score,
            )
        self.metrics.knn_latency.observe(timings["search"])
        self.metrics.reduce_latency.observe(timings["reduce"])
        if "verify" in timings:
            self.metrics.verify_latency.observe(timings["verify"] + timings.get("chroma", 0.0))
        return SearchResult(hits, duration, timings, clip_warnings(duration))


@contextmanager
def same_omp_threads() -> Iterator[None]:
    """The calling thread's OpenMP thread count as it was before the block. A thread's first
    torch operation sets it to torch's count, and FAISS may share torch's OpenMP runtime
    (torch loads it globally): the chroma CQT in a request thread must not change what that
    thread's searches run with."""
    before = faiss.omp_get_max_threads()
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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
