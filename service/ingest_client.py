"""The HTTP side of `refrain ingest`: retries, job submission and polling, resumption state.

The state is the user's, not the catalog's: `default_state_path` gives each catalog its own
file under the XDG state folder, and `adopt_legacy_state` moves the file that older versions
left inside the catalog folder there, so that an ingest they interrupted still resumes.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from tqdm import tqdm

from refrain.service.catalog_files import Entry, batch_key, open_files

IN_FLIGHT = 2  # jobs submitted and not finished: upload the next batch while one is processed
MAX_BACKOFF_S = 60.0

RETRY_STATUS = (429, 503)

# where older versions kept the state: in the catalog folder, beside the files it describes
LEGACY_STATE_FILE = ".refrain-ingest-state.json"


@dataclass
class Summary:
    added: int = 0  # items the service stored (added or replaced)
    skipped: int = 0  # already present with the same content
    failed: int = 0
    earlier: int = 0  # files of batches finished by an earlier run, not sent again
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, id, code, msg

    def render(self) -> str:
        lines = [
            (
                f"ingest: added {self.added}, skipped {self.skipped} (already present), "
                f"failed {self.failed}"
            )
        ]
        if self.earlier:
            lines.append(f"  {self.earlier} files were ingested by an earlier run (not re-sent)")
        for name, track_id, code, message in self.failures:
            lines.append(f"  failed {name} ({track_id}): {code}: {message}")
        return "\n".join(lines)


class Uploader:
    """Sends batches as jobs, polls them, and records progress in the state file."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        state_path: Path,
        retries: int,
        poll_s: float,
        replace: bool = False,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.client = httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(60.0, read=600.0, write=600.0)
        )
        self.retries = max(0, retries)
        self.poll_s = poll_s
        self.replace = replace
        self.state_path = state_path
        self.state = _load_state(state_path)
        self.batches: dict[str, dict[str, Any]] = (
            self.state.setdefault("servers", {}).setdefault(url, {}).setdefault("batches", {})
        )
        self.summary = Summary()
        self._inflight: dict[str, list[Any]] = {}  # key -> [batch, job id, items seen final]
        self._bar: tqdm | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self._bar is not None:
            self._bar.close()

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def run(self, work: list[list[Entry]], total: int) -> Summary:
        self._bar = tqdm(total=total, unit="file", desc="ingest", dynamic_ncols=True)
        for batch in work:
            key = batch_key(batch)
            rec = self.batches.get(key, {})
            if rec.get("state") == "done":
                self.summary.earlier += len(batch)
                self._progress(len(batch))
                continue
            while len(self._inflight) >= IN_FLIGHT:
                self._poll_round()
            if rec.get("state") == "submitted":
                self._inflight[key] = [batch, rec["job_id"], 0]
            else:
                self._submit(key, batch)
        while self._inflight:
            self._poll_round()
        self._bar.close()
        return self.summary

    # -- jobs ----------------------------------------------------------------------------------

    def _submit(self, key: str, batch: list[Entry]) -> None:
        data = {"replace": "true"} if self.replace else None
        r = self._request("POST", "/v1/ingest", batch=batch, data=data)
        if r.status_code == 202:
            job_id = r.json()["job_id"]
            self.batches[key] = {"state": "submitted", "job_id": job_id, "files": len(batch)}
            self._save()
            self._inflight[key] = [batch, job_id, 0]
            return
        code, message = _error(r)
        if r.status_code in (401, 403):
            raise PermissionError(
                f"the service refused the API key ({code}: {message}); "
                "pass --api-key or set REFRAIN_API_KEY"
            )
        self.batches[key] = {"state": "refused", "files": len(batch), "error": message}
        self._save()
        self.summary.failed += len(batch)
        for e in batch:
            self.summary.failures.append((e.name, e.track_id, code, f"batch refused: {message}"))
        self._progress(len(batch))

    def _poll_round(self) -> None:
        finished = False
        for key, slot in list(self._inflight.items()):
            batch, job_id, seen = slot
            r = self._request("GET", f"/v1/jobs/{job_id}")
            if r.status_code == 404:  # the service lost the job (data folder reset): resend
                self._progress(-seen)
                del self._inflight[key]
                self._submit(key, batch)
                continue
            if r.status_code != 200:
                code, message = _error(r)
                raise ConnectionError(f"polling job {job_id}: {r.status_code} {code}: {message}")
            job = r.json()
            counts = job["counts"]
            final = counts["total"] - counts["pending"]
            self._progress(final - seen)
            slot[2] = final
            if job["state"] in ("done", "failed"):
                finished = True
                del self._inflight[key]
                self._record(key, batch, job)
        if not finished and self._inflight:
            time.sleep(self.poll_s)

    def _record(self, key: str, batch: list[Entry], job: dict[str, Any]) -> None:
        counts = job["counts"]
        self.summary.added += counts["done"]
        self.summary.skipped += counts["skipped"]
        self.summary.failed += counts["failed"]
        for err in job["errors"]:
            self.summary.failures.append(
                (err["filename"], err["track_id"], err["code"], err["message"])
            )
        # a job that failed as a whole is sent again by the next run; item failures are final
        self.batches[key] = {
            "state": "done" if job["state"] == "done" else "failed",
            "job_id": job["job_id"],
            "files": len(batch),
            "counts": counts,
        }
        self._save()

    # -- transport -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        batch: list[Entry] | None = None,
        data: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One request, retried on connection errors and 429/503 with exponential backoff."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            with ExitStack() as stack:  # files are reopened for every attempt
                files = open_files(stack, batch) if batch is not None else None
                try:
                    r = self.client.request(method, path, files=files, data=data)
                except httpx.TransportError as e:
                    if attempt >= self.retries:
                        raise ConnectionError(f"cannot reach {self.url}: {e}") from e
                    wait, why = delay, f"{type(e).__name__}: {e}"
                else:
                    if r.status_code not in RETRY_STATUS or attempt >= self.retries:
                        return r
                    wait, why = _retry_after(r, delay), f"HTTP {r.status_code}"
            tqdm.write(f"{method} {path}: {why}; retrying in {wait:.1f} s")
            time.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _save(self) -> None:
        _write_state(self.state_path, self.state)


def default_state_path(source: Path) -> Path:
    """The state file of the catalog `source` (a folder or a manifest): one per catalog, named
    after it and a hash of its absolute path, in $XDG_STATE_HOME/refrain/ingest
    (~/.local/state/refrain/ingest when the variable is unset or not an absolute path)."""
    home = os.environ.get("XDG_STATE_HOME", "")
    root = Path(home) if os.path.isabs(home) else Path.home() / ".local" / "state"
    resolved = source.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return root / "refrain" / "ingest" / f"{resolved.stem or 'catalog'}-{digest}.json"


def adopt_legacy_state(source: Path, state_path: Path) -> bool:
    """Move the state file an older version left in the catalog folder of `source` to
    `state_path` (merged into the state there, whose records win); True if there was one."""
    legacy = (source if source.is_dir() else source.parent) / LEGACY_STATE_FILE
    if not legacy.is_file() or legacy.resolve() == state_path.resolve():
        return False
    old, state = _load_state(legacy), _load_state(state_path)
    for url, server in old.get("servers", {}).items():
        servers = state.setdefault("servers", {})
        batches = servers.setdefault(url, {}).setdefault("batches", {})
        for key, record in server.get("batches", {}).items():
            batches.setdefault(key, record)
    _write_state(state_path, state)
    legacy.unlink()
    return True


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": 1}
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the state file {path} ({e}); remove it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("version") != 1:
        raise ValueError(f"{path} is not a state file of refrain ingest")
    return state


def _retry_after(r: httpx.Response, default: float) -> float:
    value = r.headers.get("retry-after")
    if not value:
        return default
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return default
    return min(max(when - time.time(), 0.0), MAX_BACKOFF_S)


def _error(r: httpx.Response) -> tuple[str, str]:
    try:
        err = r.json()["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{r.status_code}", r.text[:200]
