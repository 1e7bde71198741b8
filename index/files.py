"""The index directory: file names, durable file writes, the writer lock and `index.json`.

`index.json` is written once, at creation, and records what every reader must agree on:
the embedding model's identity, the FAISS factory and the dtype of the exact vector copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .types import IdentityMismatchError, IndexLockedError, IndexNotFoundError

FORMAT_NAME = "refrain-segment-index"
FORMAT_VERSION = 1

LOCK_FILE = "LOCK"
INDEX_FILE = "index.json"
JOURNAL_FILE = "journal.log"
CATALOG_FILE = "catalog.sqlite"
SNAPSHOT_DIR = "snapshot"
MANIFEST_FILE = "MANIFEST.json"

BACKUP_HINT = (
    "nothing was deleted; restore the whole index directory from a backup "
    "(deploy/README.md, section 'Backup and restore'), or rebuild it with "
    "`refrain index build`"
)
REBUILD_HINT = (
    "rebuild it with `refrain index build PATH --data DIR` using this model, "
    "or open it with the model it was built with"
)


def fsync_dir(path: Path) -> None:
    """Make a rename or a file creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> int:
    """Write `path` through a temporary file, fsync, rename, fsync the directory.

    Returns the size in bytes. A crash leaves either the old file or the new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def write_json_atomic(path: Path, data: Any) -> int:
    blob = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    return write_atomic(path, lambda f: f.write(blob))


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while walking
                total += os.stat(os.path.join(root, name)).st_size
    return total


class WriterLock:
    """An exclusive `flock` on `<index>/LOCK`, held while the index is open.

    The kernel drops it when the process dies, so a crash never leaves a stale lock.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"process {holder}" if holder else "another process"
            raise IndexLockedError(
                f"index at {directory} is already open for writing by {who} "
                f"(lock file {self.path}); close it there first"
            ) from e
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def validate_identity(identity: Any) -> dict[str, Any]:
    if not isinstance(identity, dict):
        raise TypeError(f"identity must be a dict, got {type(identity).__name__}")
    zdim = identity.get("zdim")
    if not isinstance(zdim, int) or isinstance(zdim, bool) or zdim <= 0:
        raise ValueError(f"identity['zdim'] must be a positive int, got {zdim!r}")
    try:
        # a JSON round trip is what will be compared on the next open
        return json.loads(json.dumps(identity, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"identity must be JSON-serialisable: {e}") from e


def identity_diff(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """One line per differing field: `zdim: index has 1024, model has 128`."""
    lines = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: index has {a!r}, model has {b!r}")
    return lines


def create_index_file(
    directory: Path, identity: dict[str, Any], factory: str, vector_dtype: str
) -> dict[str, Any]:
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "identity": identity,
        "zdim": identity["zdim"],
        "factory": factory,
        "vector_dtype": vector_dtype,
        "created_at": time.time(),
    }
    write_json_atomic(directory / INDEX_FILE, info)
    return info


def read_index_file(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {directory} ({INDEX_FILE} is missing)") from None
    except ValueError as e:
        raise IndexNotFoundError(f"{path} is not valid JSON: {e}") from e
    if info.get("format") != FORMAT_NAME:
        raise IndexNotFoundError(f"{path} is not a Refrain segment index")
    if info.get("version") != FORMAT_VERSION:
        raise IndexNotFoundError(
            f"{path} has format version {info.get('version')}, this code reads {FORMAT_VERSION}"
        )
    return info


def check_identity(directory: Path, stored: dict[str, Any], given: dict[str, Any]) -> None:
    diff = identity_diff(stored, given)
    if diff:
        raise IdentityMismatchError(
            f"index at {directory} was built by a different embedding model ("
            + "; ".join(diff)
            + f"): {REBUILD_HINT}"
        )


def check_new_index_dir(path: Path, create: bool) -> None:
    """Refuse to create an index at `path` (IndexNotFoundError) unless `create` is set and
    `path` is absent, or a folder holding nothing but leftovers of an interrupted creation."""
    if not create:
        raise IndexNotFoundError(f"no index at {path} (and create=False)")
    if path.exists() and not path.is_dir():
        raise IndexNotFoundError(f"{path} is a file, not an index directory")
    if path.is_dir() and not is_fresh_directory(path):
        raise IndexNotFoundError(
            f"{path} is not empty and holds no {INDEX_FILE}: refusing to create an index inside it"
        )


def make_index_dir(path: Path) -> None:
    """Create the folder of a new index, durably."""
    if not path.is_dir():
        path.mkdir(parents=True)
        fsync_dir(path.parent)


def is_fresh_directory(directory: Path) -> bool:
    """True when `directory` holds nothing but leftovers of an interrupted creation."""
    leftovers = {LOCK_FILE, INDEX_FILE + ".tmp"}
    return all(p.name in leftovers for p in directory.iterdir())
