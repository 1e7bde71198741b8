"""Safe extraction of an uploaded catalog archive: zip, or tar (plain, .gz, .bz2, .xz).

Nothing in an archive is trusted. Every member name is checked before anything is written
(no absolute paths, no `..`), and tar links, devices and FIFOs refuse the whole archive.
Extracted files never take their names from the archive: they are numbered inside the
destination folder, so no member can land anywhere else. Sizes are bounded four ways: the
member count, the sum of the sizes the headers declare, the bytes actually written while
extracting (a header may lie), and each audio member's size (the per-file upload limit).
Decompression bombs are refused by ratio, for zip members one by one and for the whole archive
of either kind (a tar.gz compresses as one stream): the archive may not inflate to more than
MAX_RATIO times its own size. Both are checked on the headers, as each is read, so a bomb is
refused at its first oversized header, before its data is ever inflated.
Only audio files and a root `manifest.csv` / `manifest.json` are taken; the rest is counted.

Every header is read and checked before the first file is written, so a refused archive
(unsafe, too large, or too large for the free disk space) leaves nothing behind. A compressed
tar is therefore decompressed twice: once for its headers, once to extract.
"""

from __future__ import annotations

import functools
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from refrain.model.audio import AUDIO_EXTENSIONS
from refrain.service.errors import InvalidInput, RefrainError, TooLarge, UnsafeArchive

MANIFEST_NAMES = ("manifest.csv", "manifest.json")
MAX_MANIFEST_BYTES = 16 << 20
# Audio barely compresses; a member that inflates more than this is a bomb, not a song
# (checked for members declaring more than RATIO_FLOOR bytes, so tiny files never trip it).
MAX_RATIO = 100
RATIO_FLOOR = 1 << 20
CHUNK = 1 << 20
# Resource forks and Finder metadata that macOS adds to zips: never audio.
_JUNK_PREFIXES = ("__MACOSX/",)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError)


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int  # members of any kind
    max_bytes: int  # uncompressed bytes, declared and extracted
    max_file_bytes: int | None = None  # one audio member, uncompressed (None: no limit)

    def inflated(self, archive_bytes: int) -> int:
        """Uncompressed bytes allowed for an archive of `archive_bytes`: the size limit, or
        MAX_RATIO times the archive (never below RATIO_FLOOR), whichever is smaller."""
        return min(self.max_bytes, max(RATIO_FLOOR, MAX_RATIO * archive_bytes))


@dataclass
class Extracted:
    files: list[tuple[str, Path]] = field(default_factory=list)  # (member name, stored file)
    manifest: tuple[str, bytes] | None = None  # (name, content) of the root manifest
    ignored: int = 0  # members that are neither audio nor the manifest


class _Budget:
    """Bytes still allowed to be written; raises once the archive inflates past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, n: int, name: str) -> None:
        self.left -= n
        if self.left < 0:
            raise _too_large(f"member {name!r} inflates the archive past {self.limit} bytes")


def _check_declared(declared: int, name: str, archive_bytes: int, limits: ArchiveLimits) -> None:
    """Refuse once the sizes declared so far (through member `name`) cross a limit."""
    if declared > limits.max_bytes:
        raise _too_large(
            f"archive declares more than {limits.max_bytes} uncompressed bytes "
            f"(reached at member {name!r})"
        )
    if declared > limits.inflated(archive_bytes):
        raise _unsafe(
            name,
            f"takes the archive of {archive_bytes} bytes past {declared} uncompressed "
            f"(more than {MAX_RATIO}:1): refusing a likely decompression bomb",
        )


def _check_file(size: int, name: str, limits: ArchiveLimits) -> None:
    if limits.max_file_bytes is not None and size > limits.max_file_bytes:
        raise TooLarge(
            "file_too_large",
            f"archive member {name[:200]!r} has {size} bytes, at most "
            f"{limits.max_file_bytes} per file",
        )


def _too_large(message: str) -> RefrainError:
    return TooLarge("archive_too_large", message)


def _unsafe(name: str, why: str) -> RefrainError:
    return UnsafeArchive("unsafe_archive", f"archive member {name[:200]!r} {why}")


def _bad(message: str) -> RefrainError:
    return InvalidInput(
        "bad_archive",
        f"expected a zip or tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz): {message}",
    )


def _unreadable(name: str, e: Exception) -> Exception:
    if isinstance(e, OSError) and e.errno is not None:
        return e  # a real I/O error (disk full...), not a corrupt archive
    return _bad(f"member {name!r} is unreadable ({e or type(e).__name__})")


def safe_name(raw: str) -> str:
    """A member name as a clean relative path, or UnsafeArchive."""
    if "\x00" in raw:
        raise _unsafe(raw, "has a NUL character in its name")
    if raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":"):
        raise _unsafe(raw, "has an absolute path")
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(raw, "points outside the archive ('..')")
    return "/".join(parts)


def _kind(name: str) -> str:
    """'audio', 'manifest' or 'other'."""
    if name.lower() in MANIFEST_NAMES:
        return "manifest"
    base = name.rsplit("/", 1)[-1]
    if name.startswith(_JUNK_PREFIXES) or base.startswith("._"):
        return "other"
    return "audio" if os.path.splitext(base)[1].lower() in AUDIO_EXTENSIONS else "other"


def copy_to_file(src: IO[bytes], dst: Path, budget: _Budget | None = None, name: str = "") -> int:
    """Stream `src` into a new file `dst` in chunks and fsync it; returns the bytes written."""
    written = 0
    with open(dst, "xb") as out:
        while chunk := src.read(CHUNK):
            if budget is not None:
                budget.take(len(chunk), name)
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def _read_manifest(src: IO[bytes], name: str, budget: _Budget) -> bytes:
    data = src.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise TooLarge("manifest_too_large", f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
    budget.take(len(data), name)
    return data


SpaceCheck = Callable[[int], None]  # raises unless that many more bytes may be written


def extract_archive(
    src: BinaryIO, dest: Path, limits: ArchiveLimits, check_space: SpaceCheck | None = None
) -> Extracted:
    """Extract the audio files of the archive in `src` (seekable) into `dest` (an existing,
    empty folder). Raises TooLarge or UnsafeArchive on unsafe, oversized or unreadable archives;
    files already written are left for the caller to remove. `check_space` gets the bytes
    the audio members declare before anything is written."""
    check = check_space or _no_check
    size = src.seek(0, os.SEEK_END)
    src.seek(0)
    head = src.read(4)
    src.seek(0)
    if head in _ZIP_MAGIC:
        return _extract_zip(src, size, dest, limits, check)
    try:
        with tarfile.open(fileobj=src, mode="r:*") as tar:
            return _extract_tar(tar, size, dest, limits, check)
    except tarfile.TarError as e:  # not a tar in any compression (members are checked inside)
        src.seek(0)
        if zipfile.is_zipfile(src):  # a zip with a prefix (self-extracting)
            src.seek(0)
            return _extract_zip(src, size, dest, limits, check)
        raise _bad(str(e) or type(e).__name__) from None


def _no_check(n: int) -> None:
    pass


def _extract_zip(
    src: BinaryIO, size: int, dest: Path, limits: ArchiveLimits, check: SpaceCheck
) -> Extracted:
    try:
        zf = zipfile.ZipFile(src)
    except _CORRUPT as e:
        raise _bad(str(e)) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise _too_large(f"archive has {len(infos)} members, at most {limits.max_files}")
        names = []
        declared = audio = 0
        for info in infos:
            name = safe_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _unsafe(info.filename, "is a symbolic link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _unsafe(info.filename, "is not a regular file or folder")
            if info.flag_bits & 0x1:
                raise _bad(f"member {info.filename!r} is encrypted")
            if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
                raise _unsafe(
                    info.filename,
                    f"inflates {info.compress_size} bytes to {info.file_size} "
                    f"(more than {MAX_RATIO}:1): refusing a likely decompression bomb",
                )
            declared += info.file_size
            _check_declared(declared, name, size, limits)
            if not info.is_dir() and _kind(name) == "audio":
                _check_file(info.file_size, name, limits)
                audio += info.file_size
            names.append(name)
        check(audio)
        return _extract_members(
            [
                (name, info.is_dir(), functools.partial(zf.open, info))
                for info, name in zip(infos, names, strict=False)
            ],
            dest,
            limits.inflated(size),
        )


def _extract_tar(
    tar: tarfile.TarFile, size: int, dest: Path, limits: ArchiveLimits, check: SpaceCheck
) -> Extracted:
    members = _tar_members(tar, size, limits)
    check(sum(m.size for m, name in members if m.isreg() and _kind(name) == "audio"))
    return _extract_members(
        [(name, m.isdir(), functools.partial(tar.extractfile, m)) for m, name in members],
        dest,
        limits.inflated(size),
    )


Opener = Callable[[], IO[bytes] | None]  # a member's contents (None: not a regular file)


def _open(opener: Opener, name: str) -> IO[bytes]:
    data = opener()
    if data is None:
        raise _unsafe(name, "is not a regular file")
    return data


def _extract_members(
    members: list[tuple[str, bool, Opener]], dest: Path, max_bytes: int
) -> Extracted:
    """Store the audio members and read the top-level manifest of an archive whose members
    (clean name, is a folder, opener) have all been checked; at most `max_bytes` in all."""
    out = Extracted()
    budget = _Budget(max_bytes)
    for name, is_dir, open_member in members:
        kind = "dir" if is_dir else _kind(name)
        try:
            if kind == "audio":
                with _open(open_member, name) as data:
                    _store(out, data, name, dest, budget)
            elif kind == "manifest" and "/" not in name:
                with _open(open_member, name) as data:
                    out.manifest = (name, _read_manifest(data, name, budget))
            elif kind != "dir":
                out.ignored += 1
        except _CORRUPT as e:
            raise _unreadable(name, e) from None
    return out


def _tar_members(
    tar: tarfile.TarFile, size: int, limits: ArchiveLimits
) -> list[tuple[tarfile.TarInfo, str]]:
    """Every member with its clean name, all checked; nothing is extracted yet."""
    found: list[tuple[tarfile.TarInfo, str]] = []
    declared = 0
    members = iter(tar)
    while True:
        try:  # headers are read lazily: a corrupt stream fails here
            member = next(members)
        except StopIteration:
            return found
        except _CORRUPT as e:
            raise _bad(str(e) or type(e).__name__) from None
        if len(found) >= limits.max_files:
            raise _too_large(f"archive has more than {limits.max_files} members")
        name = safe_name(member.name)
        if member.issym() or member.islnk():
            raise _unsafe(member.name, f"is a {'symbolic' if member.issym() else 'hard'} link")
        if not (member.isreg() or member.isdir()):
            raise _unsafe(member.name, "is a device, FIFO or other special file")
        declared += member.size
        _check_declared(declared, name, size, limits)  # before the member's data is read
        if member.isreg() and _kind(name) == "audio":
            _check_file(member.size, name, limits)
        found.append((member, name))


def _store(out: Extracted, member: IO[bytes], name: str, dest: Path, budget: _Budget) -> None:
    ext = os.path.splitext(name)[1].lower()
    path = dest / f"{len(out.files):06d}{ext}"
    copy_to_file(member, path, budget, name)
    out.files.append((name, path))
