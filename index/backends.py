"""The approximate (or exact) nearest-neighbour search over segment vectors, with FAISS.

`AnnIndex` wraps any FAISS factory string so that vectors carry Refrain's segment ids:

- IVF factories keep the ids natively (`add_with_ids`, `remove_ids`).
- Others are wrapped in `IndexIDMap2`. Flat and PQ remove in place; HNSW cannot remove, so
  removed ids become tombstones, filtered out of results until the next rebuild (compaction).
- Factories that need training (IVF, PQ) start as an exact `IndexFlatL2` over the same ids
  and are trained and filled at the first snapshot that holds `min_train` vectors. They are
  retrained (at a snapshot) each time the collection has grown RETRAIN_GROWTH-fold since, so
  that centroids learnt on the first tracks of a catalog do not stay forever.

Distances are squared L2, as FAISS returns them; the index divides by zdim (nsqeuc).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 10

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _find_hnsw(index: faiss.Index) -> bool:
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexHNSW):
            return True
        inner = getattr(index, "index", None)
        if inner is None:
            return False
        index = faiss.downcast_index(inner)


def _min_train(index: faiss.Index) -> int:
    """FAISS's rule of thumb: 39 training points per k-means centroid."""
    if index.is_trained:
        return 0
    need = [1000]
    if _is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        need.append(39 * ivf.nlist)
        index = ivf
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:
        need.append(39 * pq.ksub)
    return max(need)


def make_factory_index(zdim: int, factory: str) -> faiss.Index:
    try:
        index = faiss.index_factory(zdim, factory, faiss.METRIC_L2)
    except RuntimeError as e:
        reason = re.sub(r"^Error in .*? at \S+: ", "", str(e).strip())
        raise ValueError(
            f"invalid FAISS factory string {factory!r} for dimension {zdim}: {reason}"
        ) from e
    # Polysemous training (on by default for PQ) only serves Hamming-filtered search, which
    # is never used here, and costs seconds to minutes: 27 s for PQ8 on 2000 vectors.
    layer: Any = index
    while layer is not None:
        layer = faiss.downcast_index(layer)
        if hasattr(layer, "do_polysemous_training"):
            layer.do_polysemous_training = False
        layer = getattr(layer, "index", None)
    return index


class AnnIndex:
    """Segment-id keyed FAISS index; callers serialise mutation against search."""

    def __init__(
        self, zdim: int, factory: str, search_params: str | None = None, use_gpu: bool | None = None
    ) -> None:
        self.zdim = zdim
        self.factory = factory
        probe = make_factory_index(zdim, factory)
        self.ivf = _is_ivf(probe)
        self.hnsw = _find_hnsw(probe)
        self.removable = not self.hnsw  # False: removed ids become tombstones
        self.min_train = _min_train(probe)
        self.trained = probe.is_trained
        self.trained_on = 0  # vectors present at the last training (0: none needed)
        self.exact = isinstance(faiss.downcast_index(probe), faiss.IndexFlat)
        if search_params is None:
            defaults = []
            if self.ivf:
                defaults.append(f"nprobe={min(16, faiss.extract_index_ivf(probe).nlist)}")
            if self.hnsw:
                defaults.append("efSearch=128")
            search_params = ",".join(defaults)
        self.search_params = search_params
        self.use_gpu = use_gpu
        self.on_gpu = False
        self._gpu_resources: Any = None
        self.tombstones: set[int] = set()
        self._tomb_array = np.empty(0, dtype=np.int64)
        self.index = self._wrap(probe) if self.trained else self._staging()
        self._finish()

    # -- construction ---------------------------------------------------------------------

    def _staging(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatL2(self.zdim))

    def _wrap(self, index: faiss.Index) -> faiss.Index:
        if self.ivf or isinstance(index, faiss.IndexIDMap):
            return index
        return faiss.IndexIDMap2(index)

    def _finish(self) -> None:
        """Apply search parameters and move to GPU when asked and possible."""
        if self.trained and self.search_params:
            # (faiss's stubs say int; the SWIG binding takes the 'nprobe=16,...' string)
            faiss.ParameterSpace().set_index_parameters(self.index, self.search_params)  # type: ignore[arg-type]
        if self.use_gpu is False or not hasattr(faiss, "StandardGpuResources"):
            return
        if faiss.get_num_gpus() <= 0:
            return
        try:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
            self.on_gpu = True
        except RuntimeError as e:  # e.g. HNSW has no GPU implementation
            log.warning("keeping the %s index on CPU: %s", self.factory, e)

    @property
    def persistable(self) -> bool:
        """Worth writing to a snapshot: trained or slow to rebuild (not a plain flat scan)."""
        return self.trained and not self.exact

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # -- mutation -------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32),
            np.ascontiguousarray(ids, dtype=np.int64),
        )

    def remove_range(self, first_id: int, n: int) -> None:
        if self.removable:
            try:
                self.index.remove_ids(faiss.IDSelectorRange(first_id, first_id + n))
                return
            except RuntimeError:  # e.g. a GPU index: fall back to tombstones from now on
                self.removable = False
        self.tombstones.update(range(first_id, first_id + n))
        self._tomb_array = np.fromiter(self.tombstones, np.int64, len(self.tombstones))

    def wants_rebuild(self, n_live: int, dead_fraction: float) -> bool:
        if not self.trained:
            return n_live >= self.min_train
        if self.trained_on and n_live >= RETRAIN_GROWTH * self.trained_on:
            return True
        return bool(self.tombstones) and len(self.tombstones) > dead_fraction * max(n_live, 1)

    def rebuild(
        self, batches: Batches, sample: Callable[[int], np.ndarray], n_live: int
    ) -> AnnIndex:
        """A new index of the same factory, trained if needed, holding exactly `batches()`
        (`n_live` vectors)."""
        new = AnnIndex.__new__(AnnIndex)
        new.__dict__.update(self.__dict__)
        new.tombstones, new._tomb_array = set(), np.empty(0, dtype=np.int64)
        new.on_gpu, new._gpu_resources = False, None
        new.removable = not self.hnsw
        index = make_factory_index(self.zdim, self.factory)
        if not index.is_trained:
            train = sample(256 * max(self.min_train // 39, 1))
            if len(train) < self.min_train:
                raise ValueError(
                    f"{self.factory} needs {self.min_train} training vectors, got {len(train)}"
                )
            index.train(train)
            new.trained_on = n_live
        new.trained = True
        new.index = new._wrap(index)
        for ids, vectors in batches():
            new.add(vectors, ids)
        new._finish()
        return new

    # -- search ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2, ids), ascending per row; missing results are (inf, -1)."""
        q = len(queries)
        n = self.ntotal
        if n == 0 or k == 0:
            return np.full((q, k), np.inf, np.float32), np.full((q, k), -1, np.int64)
        if not self.tombstones:
            distances, ids = self.index.search(queries, k)
            return np.where(ids < 0, np.inf, distances).astype(np.float32), ids
        # over-fetch until every row has k live results (or the index is exhausted)
        fetch = min(n, 2 * k + 16)
        while True:
            distances, ids = self.index.search(queries, fetch)
            dead = np.isin(ids, self._tomb_array) | (ids < 0)
            if fetch >= n or int((~dead).sum(axis=1).min()) >= k:
                break
            fetch = min(n, fetch * 4)
        order = np.argsort(dead, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        distances = np.take_along_axis(distances, order, axis=1)
        gone = np.take_along_axis(dead, order, axis=1)
        ids[gone] = -1
        distances = np.where(gone, np.inf, distances).astype(np.float32)
        if ids.shape[1] < k:  # fewer than k vectors in all
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
        return distances, ids

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the index to `path` and fsync it (the caller renames it into place)."""
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(index, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(
        cls,
        path: Path,
        zdim: int,
        factory: str,
        tombstones: np.ndarray,
        trained_on: int,
        search_params: str | None = None,
        use_gpu: bool | None = None,
    ) -> AnnIndex:
        ann = cls(zdim, factory, search_params, use_gpu=False)
        ann.index = faiss.read_index(str(path))
        ann.trained = True
        ann.trained_on = trained_on
        if ann.index.d != zdim:
            raise ValueError(f"{path} holds a {ann.index.d}-d index, expected {zdim}")
        if len(tombstones):
            ann.tombstones = set(tombstones.tolist())
            ann._tomb_array = np.asarray(tombstones, dtype=np.int64)
        ann.use_gpu = use_gpu
        ann._finish()
        return ann
