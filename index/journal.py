"""The append-only write journal: every write is a record here, durable before it is applied.

File layout (little-endian)::

    header   b"RFRNJRNL" | u32 version | u32 zdim                          16 bytes
    record   b"RREC" | u32 payload_len | u32 crc32(payload_len, payload)    12 bytes
             payload: u64 seq | u8 op | u8 dtype | u16 0 | u32 meta_len
                      | u64 first_segment_id | u32 n_segments              28 bytes
                      | meta JSON (utf-8) | starts f64[n] | vectors dtype[n, zdim]

A crash can only tear the record being appended, which is the last one. At open the file is
scanned; the first record that is short, has a bad magic, length or CRC ends the valid prefix
and everything after it is truncated away. If a valid record still follows the bad one, the
damage is not a torn append but corruption in the middle of acknowledged data:
`CorruptIndexError` is raised rather than dropping those records.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import fsync_dir
from .types import CorruptIndexError

log = logging.getLogger(__name__)

FILE_MAGIC = b"RFRNJRNL"
FILE_VERSION = 1
_FILE_HEADER = struct.Struct("<8sII")
RECORD_MAGIC = b"RREC"
_REC_HEADER = struct.Struct("<4sII")
_PAYLOAD_HEAD = struct.Struct("<QBBHIQI")

DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

_fsync = getattr(os, "fdatasync", os.fsync)


class Op(enum.IntEnum):
    ADD = 1
    REPLACE = 2  # delete the old segments and add the new ones, atomically
    DELETE = 3


@dataclass(frozen=True)
class Record:
    seq: int
    op: Op
    track_id: str
    meta: dict[str, Any]  # TrackRecord.to_stored() for ADD/REPLACE, {"track_id"} for DELETE
    first_segment_id: int = 0
    starts: np.ndarray | None = None  # (n,) float64 seconds
    vectors: np.ndarray | None = None  # (n, zdim) in the index's vector dtype

    @property
    def n_segments(self) -> int:
        return 0 if self.starts is None else len(self.starts)


def record_size(n_segments: int, zdim: int, itemsize: int, meta_bytes: int) -> int:
    """Bytes that one record of `n_segments` vectors takes in the journal (see `encode`)."""
    return _REC_HEADER.size + _PAYLOAD_HEAD.size + meta_bytes + n_segments * (8 + itemsize * zdim)


def encode(record: Record) -> bytes:
    meta = json.dumps(record.meta, sort_keys=True, separators=(",", ":")).encode()
    n = record.n_segments
    dtype_code = 0
    body = b""
    if n:
        assert record.vectors is not None and record.starts is not None
        vectors = np.ascontiguousarray(record.vectors)
        dtype_code = DTYPE_CODES[vectors.dtype.newbyteorder("<")]
        starts = np.ascontiguousarray(record.starts, dtype="<f8")
        body = starts.tobytes() + vectors.astype(vectors.dtype.newbyteorder("<")).tobytes()
    payload = (
        _PAYLOAD_HEAD.pack(
            record.seq, int(record.op), dtype_code, 0, len(meta), record.first_segment_id, n
        )
        + meta
        + body
    )
    length = struct.pack("<I", len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return _REC_HEADER.pack(RECORD_MAGIC, len(payload), crc) + payload


def _decode_payload(payload: bytes, zdim: int) -> Record:
    seq, op, dtype_code, _, meta_len, first, n = _PAYLOAD_HEAD.unpack_from(payload)
    at = _PAYLOAD_HEAD.size
    meta = json.loads(payload[at : at + meta_len])
    at += meta_len
    starts = vectors = None
    if n:
        dtype = DTYPES[dtype_code]
        starts = np.frombuffer(payload, "<f8", n, at)
        at += 8 * n
        vectors = np.frombuffer(payload, dtype, n * zdim, at).reshape(n, zdim)
        at += dtype.itemsize * n * zdim
    if at != len(payload):
        raise ValueError(f"payload has {len(payload) - at} trailing bytes")
    return Record(seq, Op(op), meta["track_id"], meta, first, starts, vectors)


def _parse_at(buf: memoryview, offset: int, zdim: int) -> tuple[Record, int] | None:
    """The record starting at `offset` and its end offset, or None when it is not valid."""
    if len(buf) - offset < _REC_HEADER.size:
        return None
    magic, length, crc = _REC_HEADER.unpack_from(buf, offset)
    start = offset + _REC_HEADER.size
    if magic != RECORD_MAGIC or length < _PAYLOAD_HEAD.size or start + length > len(buf):
        return None
    payload = bytes(buf[start : start + length])
    if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
        return None
    try:
        return _decode_payload(payload, zdim), start + length
    except (ValueError, KeyError, struct.error):
        return None


class Journal:
    """An open journal file. Not thread-safe: the index serialises writers."""

    def __init__(self, path: Path, zdim: int) -> None:
        self.path = path
        self.zdim = zdim
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size < _FILE_HEADER.size:
            # new, or a creation interrupted before its header was durable
            self._write_header()
            fsync_dir(path.parent)
        else:
            magic, version, file_zdim = _FILE_HEADER.unpack(os.pread(self._fd, 16, 0))
            if magic != FILE_MAGIC or version != FILE_VERSION or file_zdim != zdim:
                os.close(self._fd)
                raise CorruptIndexError(
                    f"{path}: not a version-{FILE_VERSION} journal of dimension {zdim} "
                    f"(magic {magic!r}, version {version}, zdim {file_zdim})"
                )
        self.end = _FILE_HEADER.size  # end of the valid prefix; set by replay()
        self.n_records = 0
        self._replayed = False
        self.damaged: str | None = None  # set when a failed append could not be undone

    def _write_header(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, self.zdim), 0)
        os.fsync(self._fd)

    @property
    def size_bytes(self) -> int:
        return self.end

    def replay(self) -> Iterator[Record]:
        """Yield every valid record in order; truncate a torn tail when exhausted."""
        size = os.fstat(self._fd).st_size
        with open(self.path, "rb") as f:
            raw = f.read(size)
        buf = memoryview(raw)
        offset = _FILE_HEADER.size
        prev_seq = None
        while offset < len(buf):
            parsed = _parse_at(buf, offset, self.zdim)
            if parsed is None:
                self._check_tail(raw, offset)
                break
            record, offset = parsed
            if prev_seq is not None and record.seq != prev_seq + 1:
                raise CorruptIndexError(
                    f"{self.path}: record seq {record.seq} follows {prev_seq} at offset {offset}"
                )
            prev_seq = record.seq
            self.n_records += 1
            self.end = offset
            yield record
        if self.end < size:
            log.warning(
                "%s: dropping a torn tail of %d bytes at offset %d (an interrupted write)",
                self.path,
                size - self.end,
                self.end,
            )
            os.ftruncate(self._fd, self.end)
            os.fsync(self._fd)
        self._replayed = True

    def records(self) -> Iterator[Record]:
        """Read the valid prefix again (after `replay`), without changing the file: what a
        rebuild of derived state (the catalog) needs while the index is open."""
        if not self._replayed:
            raise RuntimeError("replay() the journal before reading it back")
        raw = os.pread(self._fd, self.end, 0)
        buf = memoryview(raw)
        offset = _FILE_HEADER.size
        while offset < self.end:
            parsed = _parse_at(buf, offset, self.zdim)
            if parsed is None:
                raise CorruptIndexError(
                    f"{self.path}: the record at offset {offset} was valid at open and is not "
                    "now; the file changed under the index"
                )
            record, offset = parsed
            yield record

    def _check_tail(self, raw: bytes, bad: int) -> None:
        buf = memoryview(raw)
        at = raw.find(RECORD_MAGIC, bad + 1)
        while at != -1:
            if _parse_at(buf, at, self.zdim) is not None:
                raise CorruptIndexError(
                    f"{self.path}: invalid record at offset {bad} is followed by a valid one at "
                    f"offset {at}; this is not a torn append, refusing to drop acknowledged "
                    "writes (restore the index from a backup or rebuild it)"
                )
            at = raw.find(RECORD_MAGIC, at + 1)

    def append_many(self, records: list[Record]) -> None:
        """Write `records` with one write and one fsync; durable together on return. A crash
        before that leaves a prefix of them, each whole (none of them acknowledged); on a
        failure the file is left as before."""
        if not self._replayed:
            raise RuntimeError("replay() the journal before appending to it")
        if self.damaged:
            raise OSError(errno.EIO, f"{self.path} refuses appends: {self.damaged}")
        blob = b"".join(map(encode, records))
        try:
            written = os.pwrite(self._fd, blob, self.end)
            if written != len(blob):  # what a filling disk does before it says ENOSPC
                raise OSError(
                    errno.ENOSPC,
                    f"short write to {self.path}: {written} of {len(blob)} bytes (disk full?)",
                )
            _fsync(self._fd)
        except BaseException:
            self._roll_back()
            raise
        self.end += len(blob)
        self.n_records += len(records)

    def _roll_back(self) -> None:
        """Cut a failed append off again, so that the next append starts at the valid end (its
        fsync makes the cut durable too). When even that fails the file may hold a partial
        record in front of the next one: `damaged` says so and appends are refused until the
        journal is reopened, whose replay cuts the torn tail."""
        try:
            os.ftruncate(self._fd, self.end)
            size = os.fstat(self._fd).st_size
            if size != self.end:
                raise OSError(errno.EIO, f"{size} bytes after truncating to {self.end}")
        except OSError as e:
            self.damaged = f"a failed append could not be cut back to {self.end} bytes ({e})"
            log.error("%s: %s", self.path, self.damaged)

    def reset(self) -> None:
        """Drop every record (they are covered by a durable snapshot)."""
        os.ftruncate(self._fd, _FILE_HEADER.size)
        os.fsync(self._fd)
        self.end = _FILE_HEADER.size
        self.n_records = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
