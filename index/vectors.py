"""The exact copy of every reference segment, and the segment -> (track, start) mapping.

Each live track owns one `Slot`: its contiguous segment ids, its start times and its vectors in
the index's dtype (float32, or float16 to halve the footprint). A slot's arrays are either in
memory (written since the last snapshot; their durable copy is in the journal) or views into a
memory-mapped chunk file of a snapshot. Segment ids are allocated from a counter that never
goes back, so an id never names two segments over the life of an index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SEGMENT_DTYPE = np.dtype([("id", "<i8"), ("start", "<f8")])


@dataclass
class Slot:
    """The stored segments of one track."""

    track_id: str
    ordinal: int  # position in the store's name table
    first_id: int  # its segment ids are first_id .. first_id + n - 1
    vectors: np.ndarray  # (n, zdim), the index's dtype
    starts: np.ndarray  # (n,) float64 seconds from the start of the track
    content_sha256: str | None
    chunk: int | None = None  # generation of the chunk file holding it; None: journal only

    @property
    def n(self) -> int:
        return len(self.starts)

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + self.n, dtype=np.int64)


@dataclass
class Chunk:
    """A memory-mapped chunk file pair of a snapshot."""

    generation: int
    segments: np.ndarray  # (n,) SEGMENT_DTYPE, ids ascending
    vectors: np.ndarray  # (n, zdim)
    dead: int = 0  # segments of tracks deleted or replaced since the chunk was written

    def slice(self, first_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.segments["id"]
        at = int(np.searchsorted(ids, first_id))
        if at + n > len(ids) or ids[at] != first_id or ids[at + n - 1] != first_id + n - 1:
            raise ValueError(
                f"segments {first_id}..{first_id + n - 1} are not in chunk {self.generation}"
            )
        return self.vectors[at : at + n], self.segments["start"][at : at + n]


class VectorStore:
    """Slots by track id plus dense per-segment arrays for vectorised lookups.

    Not thread-safe by itself: the index mutates it only under its exclusive lock.
    """

    def __init__(self, zdim: int, dtype: np.dtype) -> None:
        self.zdim = zdim
        self.dtype = np.dtype(dtype)
        self.slots: dict[str, Slot] = {}
        self.chunks: dict[int, Chunk] = {}
        self.next_segment_id = 0
        self.n_segments = 0
        # dense, indexed by segment id: owning slot ordinal (-1: none) and start time
        self._owner = np.full(1024, -1, dtype=np.int64)
        self._start = np.full(1024, np.nan, dtype=np.float64)
        # track id by ordinal; always one spare None at the end so that ordinal -1 maps to None
        self._names = np.full(1024, None, dtype=object)
        self._n_ordinals = 0

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, track_id: str) -> Slot | None:
        return self.slots.get(track_id)

    @staticmethod
    def _grow(array: np.ndarray, size: int, fill: object) -> np.ndarray:
        if size <= len(array):
            return array
        bigger = np.full(max(size, 2 * len(array)), fill, dtype=array.dtype)
        bigger[: len(array)] = array
        return bigger

    def add(
        self,
        track_id: str,
        first_id: int,
        vectors: np.ndarray,
        starts: np.ndarray,
        content_sha256: str | None,
        chunk: int | None = None,
    ) -> Slot:
        if track_id in self.slots:
            raise KeyError(f"track {track_id!r} already has a slot")
        n = len(starts)
        if first_id < self.next_segment_id and chunk is None:
            raise ValueError(f"segment id {first_id} was already allocated")
        ordinal = self._n_ordinals
        self._n_ordinals += 1
        self._names = self._grow(self._names, self._n_ordinals + 1, None)
        self._names[ordinal] = track_id
        end = first_id + n
        self._owner = self._grow(self._owner, end, -1)
        self._start = self._grow(self._start, end, np.nan)
        self._owner[first_id:end] = ordinal
        self._start[first_id:end] = starts
        slot = Slot(track_id, ordinal, first_id, vectors, starts, content_sha256, chunk)
        self.slots[track_id] = slot
        self.next_segment_id = max(self.next_segment_id, end)
        self.n_segments += n
        if chunk is not None:
            self.chunks[chunk].dead -= n  # a loaded chunk starts with every segment dead
        return slot

    def remove(self, track_id: str) -> Slot | None:
        slot = self.slots.pop(track_id, None)
        if slot is None:
            return None
        self._owner[slot.first_id : slot.first_id + slot.n] = -1
        self._start[slot.first_id : slot.first_id + slot.n] = np.nan
        self._names[slot.ordinal] = None
        self.n_segments -= slot.n
        if slot.chunk is not None:
            self.chunks[slot.chunk].dead += slot.n
        return slot

    def add_chunk(self, chunk: Chunk) -> None:
        chunk.dead = len(chunk.segments)  # slots added with `chunk=` bring it down
        self.chunks[chunk.generation] = chunk

    def move_to_chunk(self, chunk: Chunk, slots: list[Slot]) -> None:
        """Point `slots` at their copies in `chunk` (freeing their in-memory arrays)."""
        self.chunks[chunk.generation] = chunk
        chunk.dead = len(chunk.segments) - sum(s.n for s in slots)
        for slot in slots:
            if slot.chunk is not None and slot.chunk != chunk.generation:
                self.chunks[slot.chunk].dead += slot.n
            slot.vectors, slot.starts = chunk.slice(slot.first_id, slot.n)
            slot.chunk = chunk.generation
        self.drop_dead_chunks()

    def drop_dead_chunks(self) -> None:
        for gen in [g for g, c in self.chunks.items() if c.dead >= len(c.segments)]:
            del self.chunks[gen]  # no slot views it any more

    def chunk_dead_fraction(self) -> float:
        total = sum(len(c.segments) for c in self.chunks.values())
        return 0.0 if total == 0 else sum(c.dead for c in self.chunks.values()) / total

    def pending(self) -> list[Slot]:
        """Slots whose vectors exist only in memory and the journal, by segment id."""
        return sorted((s for s in self.slots.values() if s.chunk is None), key=lambda s: s.first_id)

    def by_segment_id(self) -> list[Slot]:
        return sorted(self.slots.values(), key=lambda s: s.first_id)

    def segment_info(self, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(segment_ids, dtype=np.int64)
        known = (ids >= 0) & (ids < self.next_segment_id)
        safe = np.where(known, ids, 0)
        owner = np.where(known, self._owner[safe], -1)
        starts = np.where(owner >= 0, self._start[safe], np.nan)
        return self._names[owner], starts

    def batches(self, rows: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of every live segment, in batches of about `rows`."""
        ids: list[np.ndarray] = []
        vecs: list[np.ndarray] = []
        size = 0
        for slot in self.by_segment_id():
            ids.append(slot.ids)
            vecs.append(np.asarray(slot.vectors, dtype=np.float32))
            size += slot.n
            if size >= rows:
                yield np.concatenate(ids), np.concatenate(vecs)
                ids, vecs, size = [], [], 0
        if size:
            yield np.concatenate(ids), np.concatenate(vecs)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Up to `n` distinct live segment vectors (float32), drawn uniformly."""
        slots = self.by_segment_id()
        counts = np.array([s.n for s in slots], dtype=np.int64)
        total = int(counts.sum())
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        which = np.searchsorted(offsets, picks, side="right") - 1
        out = np.empty((len(picks), self.zdim), dtype=np.float32)
        values, first, count = np.unique(which, return_index=True, return_counts=True)
        for i, a, c in zip(values, first, count, strict=True):  # picks are sorted: runs
            out[a : a + c] = slots[i].vectors[picks[a : a + c] - offsets[i]]
        return out
