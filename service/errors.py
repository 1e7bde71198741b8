"""The service's domain errors: what went wrong, in words a client can act on, without HTTP.

The core (`engine`, ingestion jobs, sources, archives, storage) raises these. Each carries a
stable machine-readable `code` (`audio_too_short`, `track_exists`, ...) and a message; its
class says what kind of failure it is. The HTTP layer (`http_errors`) maps each kind to one
status in one table; the command line prints code and message; ingestion jobs retry the
transient kinds and record the others against the item.

`as_domain_error` folds the library's own exceptions (audio decoding, the index, the
inference workers) into the same kinds, so every caller sees one vocabulary.
"""

from __future__ import annotations

import logging

from refrain.index import (
    CatalogUnavailableError,
    IdentityMismatchError,
    InsufficientStorageError,
    TrackExistsError,
    TrackNotFoundError,
)
from refrain.index.milvus import BackendUnavailableError
from refrain.model.audio import (
    AudioDecodeError,
    AudioTooLongError,
    TruncatedAudioError,
    UnsupportedAudioError,
)
from refrain.service.remote_worker import WorkerRejected, WorkersUnavailable
from refrain.service.worker import Overloaded

log = logging.getLogger("refrain.service")


class RefrainError(Exception):
    """A failure with a stable `code`; `retry_after_s` set when trying again later may help."""

    transient = False  # True: the same request may succeed later (ingestion retries it)

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidInput(RefrainError):
    """The request or its audio cannot be used as sent (bad parameter, too short, silent)."""


class UnsafeArchive(InvalidInput):
    """An archive member would escape its folder, is a link or device, or cannot be read."""


class UnsupportedMedia(RefrainError):
    """The upload is not a format the service reads."""


class TooLarge(RefrainError):
    """The upload, archive, manifest or file is over a configured limit."""


class NotFound(RefrainError):
    """No such track or job."""


class Conflict(RefrainError):
    """A track with this id exists with other content."""


class Forbidden(RefrainError):
    """The operation is disabled, or the path lies outside what may be read."""


class InsufficientStorage(RefrainError):
    """The write would leave less free space on the data volume than its reserve."""


class Unavailable(RefrainError):
    """Not now: loading, overloaded, a backend down. Retry after `retry_after_s`."""

    transient = True

    def __init__(self, code: str, message: str, retry_after_s: float | None = 5.0) -> None:
        super().__init__(code, message, retry_after_s)


class UpstreamFailed(RefrainError):
    """A remote inference worker refused a request the service considers valid."""


class Misconfigured(RefrainError):
    """The index was built with another model than the one loaded."""


class Internal(RefrainError):
    """A failure nobody anticipated; logged with its traceback."""


MAX_LISTED = 20  # names quoted in one error message


def listed(names: list[str]) -> str:
    """Names for an error message: each quoted, at most `MAX_LISTED`, then how many more."""
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:MAX_LISTED]) + more


def not_ready(why: str) -> Unavailable:
    return Unavailable("not_ready", f"service is not ready ({why})")


def as_domain_error(exc: BaseException) -> RefrainError:
    """The domain error for any exception: itself, a library exception's kind, or Internal
    (logged with its traceback, since nobody expected it)."""
    if isinstance(exc, RefrainError):
        return exc
    if isinstance(exc, AudioTooLongError):
        return InvalidInput("audio_too_long", str(exc))
    if isinstance(exc, TruncatedAudioError):
        return InvalidInput("truncated_audio", str(exc))
    if isinstance(exc, UnsupportedAudioError):
        return UnsupportedMedia("unsupported_audio", str(exc))
    if isinstance(exc, AudioDecodeError):
        return InvalidInput("bad_audio", str(exc))
    if isinstance(exc, WorkersUnavailable):
        return Unavailable("workers_unavailable", f"{exc}; retry later", 5.0)
    if isinstance(exc, WorkerRejected):
        return UpstreamFailed("worker_rejected", str(exc))
    if isinstance(exc, Overloaded):
        return Unavailable("overloaded", f"{exc}; retry later", 1.0)
    if isinstance(exc, TrackNotFoundError):
        return NotFound("track_not_found", str(exc))
    if isinstance(exc, TrackExistsError):
        return Conflict("track_exists", str(exc))
    if isinstance(exc, (BackendUnavailableError, CatalogUnavailableError)):
        return Unavailable("index_unavailable", f"{exc}; retry later", 5.0)
    if isinstance(exc, InsufficientStorageError):
        return InsufficientStorage("insufficient_storage", str(exc))
    if isinstance(exc, IdentityMismatchError):
        return Misconfigured("index_model_mismatch", str(exc))
    log.error("unhandled error", exc_info=exc)
    return Internal("internal", f"internal error ({type(exc).__name__})")
