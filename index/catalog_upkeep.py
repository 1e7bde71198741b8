"""How the FAISS store keeps its SQLite catalog in step with the journal, the source of truth.

Each write reaches the catalog after its journal record is durable and applied to memory. A
catalog write that fails then (a full disk, an I/O error) does not undo the write, which is
acknowledged: the catalog is left behind. While it is, reads of it raise
`CatalogUnavailableError` (never a stale answer) and the store reports the lag as its
`failure`; it catches up by applying the journal records it missed (`Catalog.apply_many`
skips those it has), which every later write or read tries, and a background thread too,
after `CATCH_UP_FIRST_S` and then at doubling intervals up to `CATCH_UP_MAX_S`, so that the
failure clears by itself once the disk has room again. A catalog found damaged (by a write, a
read or a snapshot) is rebuilt from the snapshot's track list and the journal.

All of it runs under the store's writer mutex, as writes do, and changes the catalog only under
the write side of its readers-writer lock; see `index.store` for the write protocol.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .catalog import Catalog, is_damage
from .journal import Journal, Record
from .recovery import rebuild_catalog
from .segment_store import StoreBase
from .snapshot import Manifest
from .types import CatalogUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# while the catalog lags the journal, a background thread retries the catch-up after this
# long, doubling the wait up to the maximum (each try re-reads the journal)
CATCH_UP_FIRST_S = 0.25
CATCH_UP_MAX_S = 4.0


class CatalogUpkeep(StoreBase):
    """The catalog half of `SegmentIndex`: it sets `_journal`, `_manifest` and `_writer`, and
    calls `_keep_catalog` at open and `_stop_catching_up` at close."""

    _journal: Journal
    _manifest: Manifest
    _writer: threading.Lock

    def _keep_catalog(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._catalog_behind: str | None = None  # why the catalog lags the journal, if it does
        self._catching_up: threading.Thread | None = None  # retries while the catalog lags
        self._closing = threading.Event()

    def _apply_to_catalog(self, records: list[Record]) -> None:
        """Apply a durable write's records; a failure leaves the catalog behind, to catch up
        later. Caller holds `self._writer` and the write lock."""
        if self._catalog_behind is not None:
            # applied alone they would move `applied_seq` past the records it missed, which
            # the catch-up would then skip: it applies them all, in order, instead
            return
        try:
            self._catalog.apply_many(records)
        except sqlite3.Error as e:  # derived data: caught up from the journal later
            self._catalog_behind = f"{type(e).__name__}: {e}"
            log.error("%s: catalog write failed, it is behind the journal: %s", self.path, e)
            self._retry_catch_up()

    def _catch_up_after_write(self) -> None:
        """Try to catch up once a write is durable and in memory, which acknowledges it even
        if the catalog still lags. Caller holds `self._writer`."""
        with contextlib.suppress(CatalogUnavailableError):
            self._catch_up_catalog()

    def _catalog_failure(self) -> str | None:
        if self._catalog_behind is None:
            return None
        return (
            f"{self._catalog.path} is behind the journal ({self._catalog_behind}); "
            "it catches up by itself once it can be written"
        )

    def _catch_up_catalog(self) -> None:
        """Apply to the catalog the journal records it missed after a failed write; rebuild
        it when it is damaged. Caller holds `self._writer`."""
        if self._catalog_behind is None:
            return
        try:
            records = [r for r in self._journal.records() if r.seq > self._manifest.seq]
            with self._rw.write():
                self._catalog.apply_many(records)  # skips those it has
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise CatalogUnavailableError(
                    f"{self._catalog.path} is behind the journal ({self._catalog_behind}) and "
                    f"still cannot be written ({e}); it catches up once it can"
                ) from e
            self._rebuild_catalog(f"damaged: {e}")
        self._catalog_behind = None

    def _retry_catch_up(self) -> None:
        """Start the thread that catches the catalog up by itself once it can be written (the
        disk has room again), so that no client write or read is needed to clear the failure.
        Caller holds `self._writer`."""
        if self._catching_up is not None or self._closing.is_set():
            return
        self._catching_up = threading.Thread(
            target=self._catch_up_in_background, name="refrain-catalog-catch-up", daemon=True
        )
        self._catching_up.start()

    def _catch_up_in_background(self) -> None:
        wait = CATCH_UP_FIRST_S
        while not self._closing.wait(wait):
            wait = min(2 * wait, CATCH_UP_MAX_S)
            with self._writer:
                if self._closed or self._catalog_behind is None:
                    self._catching_up = None  # under the writer mutex: a new lag starts anew
                    return
                try:
                    self._catch_up_catalog()
                except CatalogUnavailableError:
                    continue  # still cannot be written: try again later
                except Exception:  # kept behind: every later call retries too
                    log.exception("%s: catching up the catalog failed", self.path)
                    continue
                log.info("%s: the catalog has caught up with the journal", self.path)
                self._catching_up = None
                return
        self._catching_up = None

    def _stop_catching_up(self) -> None:
        """Stop the background catch-up (the next open catches up instead). Caller does not
        hold `self._writer`: the thread may be waiting for it."""
        self._closing.set()
        thread = self._catching_up
        if thread is not None:
            thread.join(timeout=60)

    def _rebuild_catalog(self, why: str) -> None:
        """Recreate the catalog from the snapshot's track list and the journal, the source of
        truth. Caller holds `self._writer`."""
        records = [r for r in self._journal.records() if r.seq > self._manifest.seq]
        with self._rw.write():
            self._catalog.close()
            self._catalog = Catalog.reset(self._catalog.path)
            rebuild_catalog(self.path, self._catalog, self._manifest, records, why)
        self._catalog_behind = None

    def _catalog_rows(self) -> list[tuple[dict[str, Any], int]]:
        """Every track's catalog row, for a snapshot: caught up first, rebuilt if damaged.
        Caller holds `self._writer`."""
        self._catch_up_catalog()  # a snapshot lists the catalog's rows: they must be whole
        try:
            return list(self._catalog.dump())
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            self._rebuild_catalog(f"a snapshot met damage: {e}")
            return list(self._catalog.dump())

    def _read_catalog(self, read: Callable[[Catalog], T]) -> T:
        """`read(catalog)` under the read lock, after catching the catalog up if a write left
        it behind; a read that meets page damage rebuilds the catalog and reads again."""
        if self._catalog_behind is not None:
            with self._writer:
                self._check_open()
                self._catch_up_catalog()
        try:
            with self._reading():
                return read(self._catalog)
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            log.error("%s: %s is damaged (%s); rebuilding it", self.path, self._catalog.path, e)
            with self._writer:
                self._check_open()
                self._rebuild_catalog(f"a read met damage: {e}")
        with self._reading():
            return read(self._catalog)
