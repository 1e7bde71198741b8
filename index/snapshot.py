"""Snapshots: the durable state the journal starts from.

Layout of `<index>/snapshot/` (generation `g` increases with every snapshot)::

    MANIFEST.json              the commit point: generation, seq covered, file list with sizes
    tracks-<g>.jsonl           every live track: metadata, first segment id, chunk
    chunk-<c>.vectors.npy      (n, zdim) exact segment vectors, float32 or float16
    chunk-<c>.segments.npy     (n,) [("id", int64), ("start", float64)], ids ascending
    ann-<g>.faiss              the ANN index, when it is trained and not a plain flat scan
    ann-<g>.tombstones.npy     ids removed from a non-removable ANN index (HNSW)

A snapshot writes only the segments added since the previous one (a new chunk) unless it
compacts, which rewrites every live segment into one chunk. Each file is written under a
temporary name, fsynced and renamed; then the directory is fsynced and MANIFEST.json replaced
the same way. Files the manifest does not name are leftovers of an interrupted snapshot or of
an older generation, and are deleted.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import AnnIndex
from .files import BACKUP_HINT, MANIFEST_FILE, fsync_dir, write_atomic, write_json_atomic
from .types import CorruptIndexError
from .vectors import SEGMENT_DTYPE, Chunk, Slot, VectorStore

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "refrain-snapshot"


@dataclass
class Manifest:
    generation: int = 0
    seq: int = 0  # last journal record covered: replay skips records with seq <= this
    next_segment_id: int = 0
    tracks: str | None = None
    chunks: list[int] = field(default_factory=list)  # chunk generations
    ann: str | None = None
    tombstones: str | None = None
    ann_trained_on: int = 0  # vectors present when the ANN index was last trained
    sizes: dict[str, int] = field(default_factory=dict)  # every file named above
    # CRC-32 of every file named above (manifests written before checksums have none)
    checksums: dict[str, int] = field(default_factory=dict)


def read_manifest(snapdir: Path) -> Manifest:
    path = snapdir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Manifest()
    except ValueError as e:  # it is only ever replaced atomically, so this is not a crash
        raise CorruptIndexError(f"{path} is not valid JSON: {e}") from e
    if data.pop("format", None) != MANIFEST_FORMAT:
        raise CorruptIndexError(f"{path} is not a Refrain snapshot manifest")
    manifest = Manifest(**data)
    for name, size in manifest.sizes.items():
        actual = (snapdir / name).stat().st_size if (snapdir / name).exists() else -1
        if actual != size:
            raise CorruptIndexError(
                f"{snapdir / name} should hold {size} bytes, found "
                + ("no file" if actual < 0 else f"{actual}")
            )
    return manifest


def _chunk_names(gen: int) -> tuple[str, str]:
    return f"chunk-{gen}.vectors.npy", f"chunk-{gen}.segments.npy"


def load_chunk(snapdir: Path, gen: int, zdim: int, dtype: np.dtype) -> Chunk:
    vec_name, seg_name = _chunk_names(gen)
    vectors = np.load(snapdir / vec_name, mmap_mode="r")
    segments = np.load(snapdir / seg_name, mmap_mode="r")
    if vectors.dtype != dtype or vectors.ndim != 2 or vectors.shape[1] != zdim:
        raise CorruptIndexError(
            f"{snapdir / vec_name}: expected (n, {zdim}) {dtype}, got "
            f"{vectors.shape} {vectors.dtype}"
        )
    if segments.dtype != SEGMENT_DTYPE or segments.shape != (len(vectors),):
        raise CorruptIndexError(f"{snapdir / seg_name} does not match {vec_name}")
    return Chunk(gen, segments, vectors)


def iter_tracks(snapdir: Path, manifest: Manifest) -> Iterator[dict[str, Any]]:
    if manifest.tracks is None:
        return
    path = snapdir / manifest.tracks
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                yield json.loads(line)
        except ValueError as e:  # not UTF-8, or not JSON
            raise CorruptIndexError(f"{path} is damaged: {e}; {BACKUP_HINT}") from e


def load_store(snapdir: Path, manifest: Manifest, store: VectorStore) -> None:
    """Fill an empty store with the snapshot's chunks and slots."""
    for gen in manifest.chunks:
        store.add_chunk(load_chunk(snapdir, gen, store.zdim, store.dtype))
    for line in iter_tracks(snapdir, manifest):
        meta, first, gen = line["track"], line["first_segment_id"], line["chunk"]
        try:
            vectors, starts = store.chunks[gen].slice(first, meta["n_segments"])
        except (KeyError, ValueError) as e:
            raise CorruptIndexError(f"snapshot track {meta['track_id']!r}: {e}") from e
        store.add(meta["track_id"], first, vectors, starts, meta.get("content_sha256"), gen)
    store.next_segment_id = max(store.next_segment_id, manifest.next_segment_id)


def load_ann(
    snapdir: Path,
    manifest: Manifest,
    zdim: int,
    factory: str,
    search_params: str | None,
    use_gpu: bool | None,
) -> AnnIndex | None:
    if manifest.ann is None:
        return None
    tombstones = (
        np.load(snapdir / manifest.tombstones)
        if manifest.tombstones
        else np.empty(0, dtype=np.int64)
    )
    return AnnIndex.load(
        snapdir / manifest.ann,
        zdim,
        factory,
        tombstones,
        manifest.ann_trained_on,
        search_params,
        use_gpu,
    )


def _write_chunk(snapdir: Path, gen: int, slots: list[Slot], store: VectorStore) -> dict:
    n = sum(s.n for s in slots)
    sizes = {}
    for name, dtype, shape in zip(
        _chunk_names(gen), (store.dtype, SEGMENT_DTYPE), ((n, store.zdim), (n,)), strict=True
    ):
        tmp = snapdir / (name + ".tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        at = 0
        for slot in slots:
            if array.ndim == 2:
                array[at : at + slot.n] = slot.vectors
            else:
                array["id"][at : at + slot.n] = slot.ids
                array["start"][at : at + slot.n] = slot.starts
            at += slot.n
        array.flush()
        del array
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, snapdir / name)
        sizes[name] = (snapdir / name).stat().st_size
    return sizes


def write_snapshot(
    snapdir: Path,
    prev: Manifest,
    seq: int,
    store: VectorStore,
    tracks: Iterable[tuple[dict[str, Any], int]],
    ann: AnnIndex,
    compact: bool,
) -> tuple[Manifest, list[Slot]]:
    """Write generation `prev.generation + 1` and commit it by replacing the manifest.

    `tracks` are the catalog's rows; they must describe exactly the store's slots. Returns the
    new manifest and the slots now held by the new chunk (see `VectorStore.move_to_chunk`).
    """
    gen = prev.generation + 1
    if not snapdir.is_dir():
        snapdir.mkdir()
        fsync_dir(snapdir.parent)
    manifest = Manifest(generation=gen, seq=seq, next_segment_id=store.next_segment_id)
    moved = store.by_segment_id() if compact else store.pending()
    manifest.chunks = (
        [] if compact else [g for g, c in sorted(store.chunks.items()) if c.dead < len(c.segments)]
    )
    for g in manifest.chunks:
        for name in _chunk_names(g):
            manifest.sizes[name] = prev.sizes[name]
    if moved:
        manifest.sizes.update(_write_chunk(snapdir, gen, moved, store))
        manifest.chunks.append(gen)
    moved_ids = {s.track_id for s in moved}

    count = 0

    def lines() -> Iterator[bytes]:
        nonlocal count
        for meta, first in tracks:
            slot = store.get(meta["track_id"])
            if slot is None or slot.first_id != first or slot.n != meta["n_segments"]:
                raise RuntimeError(f"catalog and vector store disagree on {meta['track_id']!r}")
            chunk = gen if slot.track_id in moved_ids else slot.chunk
            count += 1
            yield (
                json.dumps(
                    {"track": meta, "first_segment_id": first, "chunk": chunk}, sort_keys=True
                )
                + "\n"
            ).encode()

    manifest.tracks = f"tracks-{gen}.jsonl"
    manifest.sizes[manifest.tracks] = write_atomic(
        snapdir / manifest.tracks, lambda f: f.writelines(lines())
    )
    if count != len(store):
        raise RuntimeError(f"catalog lists {count} tracks, the vector store holds {len(store)}")

    if ann.persistable:
        manifest.ann = f"ann-{gen}.faiss"
        manifest.ann_trained_on = ann.trained_on
        tmp = snapdir / (manifest.ann + ".tmp")
        ann.save(tmp)
        os.replace(tmp, snapdir / manifest.ann)
        manifest.sizes[manifest.ann] = (snapdir / manifest.ann).stat().st_size
        if ann.tombstones:
            manifest.tombstones = f"ann-{gen}.tombstones.npy"
            dead = np.sort(np.fromiter(ann.tombstones, np.int64, len(ann.tombstones)))
            manifest.sizes[manifest.tombstones] = write_atomic(
                snapdir / manifest.tombstones, lambda f: np.save(f, dead)
            )
    for name in manifest.sizes:  # files carried over keep their checksum, new ones get one
        carried = name in prev.checksums and prev.sizes.get(name) == manifest.sizes[name]
        manifest.checksums[name] = prev.checksums[name] if carried else file_crc32(snapdir / name)
    fsync_dir(snapdir)
    write_json_atomic(snapdir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, **asdict(manifest)})
    return manifest, moved


def file_crc32(path: Path, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def damaged_files(snapdir: Path, manifest: Manifest) -> list[str]:
    """The files whose contents no longer match the CRC-32 the manifest recorded."""
    return [
        name
        for name, crc in sorted(manifest.checksums.items())
        if file_crc32(snapdir / name) != crc
    ]


def collect_garbage(snapdir: Path, manifest: Manifest) -> None:
    """Delete every file of `snapdir` the manifest does not name."""
    if not snapdir.is_dir():
        return
    keep = set(manifest.sizes) | {MANIFEST_FILE}
    for path in snapdir.iterdir():
        if path.name not in keep:
            try:
                path.unlink()
            except OSError as e:
                log.warning("could not remove stale snapshot file %s: %s", path, e)
