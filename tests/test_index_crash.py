"""Crash safety for real: writers killed with SIGKILL, torn and corrupted journals.

Run as a script, this file is the writer process the tests kill (see `writer`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ZDIM = 8
IDENTITY = {"weights_sha256": "crash-test", "zdim": ZDIM}
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def track_data(track_id: str, version: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectors every process derives for (track, version): nothing else needs sharing."""
    rng = np.random.default_rng(zlib.crc32(f"{track_id}/{version}".encode()))
    n = int(rng.integers(1, 12))
    return rng.standard_normal((n, ZDIM)).astype(np.float32), np.arange(n) * 5.0


def track_sequence(track_id: str, version: int) -> bytes:
    """The chroma sequence stored with (track, version): 12 bytes a frame."""
    rng = np.random.default_rng(zlib.crc32(f"seq/{track_id}/{version}".encode()))
    return rng.integers(0, 256, size=12 * int(rng.integers(2, 40)), dtype=np.uint8).tobytes()


# -- the writer process ---------------------------------------------------------------------


def writer(path: str, run: int, factory: str, snapshot_every: int, die_at: int) -> None:
    """Loop forever: add, replace, delete, snapshot; print BEGIN/ACK around every write.

    With `die_at` > 0 the process SIGKILLs itself just before its `die_at`-th durable step
    (fsync, rename, truncate) inside the first explicit snapshot; negative values count the
    steps of the first add instead, and kill just after the step.
    """
    import refrain.index.files
    from refrain.index import IndexOptions, TrackRecord, open_index

    armed = False
    calls = 0

    def deadly(fn, after: bool):
        def step(*args, **kwargs):
            nonlocal calls
            calls += armed
            if armed:
                print(
                    "STEP",
                    calls,
                    fn.__name__,
                    *map(os.path.basename, map(str, args[:1])),
                    flush=True,
                )
            if armed and calls == abs(die_at) and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = fn(*args, **kwargs)
            if armed and calls == abs(die_at) and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return step

    if die_at:
        for name in ("fsync", "fdatasync", "replace", "ftruncate"):
            setattr(os, name, deadly(getattr(os, name), after=die_at < 0))
        import refrain.index.journal

        refrain.index.journal._fsync = os.fdatasync
        refrain.index.files.os = os

    opts = IndexOptions(snapshot_every_records=snapshot_every)
    ix = open_index(path, IDENTITY, factory, options=opts)
    print("OPEN", flush=True)
    live: list[str] = []
    for i in range(10**6):
        tid = f"r{run}-{i:04d}"
        if i % 5 == 4 and live:
            victim = live.pop(len(live) // 2)
            print("BEGIN DEL", victim, flush=True)
            armed = die_at < 0
            ix.delete_track(victim)
            print("ACK DEL", victim, flush=True)
        elif i % 7 == 6 and live:
            print("BEGIN REP", live[-1], flush=True)
            armed = die_at < 0
            record = TrackRecord(
                live[-1], content_sha256="v2", sequence=track_sequence(live[-1], 2)
            )
            ix.replace_track(record, *track_data(live[-1], 2))
            print("ACK REP", live[-1], flush=True)
        else:
            print("BEGIN ADD", tid, flush=True)
            armed = die_at < 0
            record = TrackRecord(
                tid, title=tid, content_sha256="v1", sequence=track_sequence(tid, 1)
            )
            ix.add_track(record, *track_data(tid, 1))
            print("ACK ADD", tid, flush=True)
            live.append(tid)
        if i % 10 == 9:
            print("SNAP", flush=True)
            armed = die_at > 0
            ix.snapshot()
            print("SNAP DONE", flush=True)
        armed = False


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    writer(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))


# -- the checks -----------------------------------------------------------------------------


def start_writer(
    path: Path, run: int, factory: str = "Flat", snapshot_every: int = 7, die_at: int = 0
) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(HERE), str(path), str(run), factory, str(snapshot_every), str(die_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


class Expected:
    """The state implied by acknowledged writes; the one in flight may or may not be there."""

    def __init__(self) -> None:
        self.version: dict[str, int | None] = {}  # None: deleted
        self.in_flight: tuple[str, str] | None = None

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            parts = line.split()
            if parts[:1] == ["BEGIN"]:
                self.in_flight = (parts[1], parts[2])
            elif parts[:1] == ["ACK"]:
                assert len(parts) == 3, f"malformed acknowledgement {line!r} in {lines[-20:]}"
                op, tid = parts[1], parts[2]
                self.version[tid] = {"ADD": 1, "REP": 2, "DEL": None}[op]
                self.in_flight = None

    def check(self, path: Path) -> None:
        from refrain.index import open_index

        with open_index(path, IDENTITY) as ix:
            allowed = {tid: {v} for tid, v in self.version.items()}
            if self.in_flight:
                op, tid = self.in_flight
                allowed.setdefault(tid, {None}).add({"ADD": 1, "REP": 2, "DEL": None}[op])
            present = set()
            cursor = None
            while True:
                page, cursor = ix.list_tracks(50, cursor)
                present |= {t.track_id for t in page}
                if cursor is None:
                    break
            assert len(ix) == len(present) and all(t in ix for t in present), "catalog != vectors"
            assert present <= set(allowed), f"unexpected tracks {present - set(allowed)}"
            for tid, versions in allowed.items():
                if tid not in present:
                    assert None in versions, f"acknowledged track {tid} is missing"
                    continue
                vectors, starts = ix.get_vectors(tid)
                version = 2 if ix.get_track(tid).content_sha256 == "v2" else 1
                assert version in versions, f"{tid} is at version {version}, want {versions}"
                want_v, want_s = track_data(tid, version)
                np.testing.assert_array_equal(vectors, want_v)  # all segments, exact
                np.testing.assert_array_equal(starts, want_s)
                assert ix.get_track(tid).n_segments == len(want_v)
                assert ix.sequences([tid]) == {tid: track_sequence(tid, version)}
                distances, ids = ix.search(want_v[:1], 1)
                assert distances[0, 0] == 0 and ids[0, 0] == ix.segment_ids(tid)[0]
            assert ix.n_segments == sum(len(ix.get_vectors(t)[0]) for t in present)
            gone = [t for t, v in allowed.items() if t not in present]
            assert ix.sequences(gone) == {}, "a deleted track's sequence is still stored"
            if self.in_flight:  # settled now: later runs must find what this one found
                tid = self.in_flight[1]
                self.version[tid] = (
                    None
                    if tid not in present
                    else (2 if ix.get_track(tid).content_sha256 == "v2" else 1)
                )
                self.in_flight = None


def complete_lines(stream) -> Iterator[str]:
    """The lines of a writer's output that it finished printing, stripped.

    A last line without its newline was cut short by the kill: that acknowledgement was not
    delivered, so its write stays in flight, as when the writer dies just before printing.
    """
    for line in stream:
        if line.endswith("\n"):
            yield line.strip()


def read_until(proc: subprocess.Popen, prefix: str, count: int, lines: list[str]) -> None:
    """Read the writer's output up to its `count`-th line starting with `prefix`."""
    for line in complete_lines(proc.stdout):
        lines.append(line)
        count -= (line + "\n").startswith(prefix)
        if count == 0:
            return
    raise AssertionError(f"writer ended early: {proc.wait()} {proc.stderr.read()[-2000:]}")


def kill(proc: subprocess.Popen, lines: list[str], *, itself: bool = False) -> None:
    """SIGKILL the writer (or wait for it to kill itself) and collect what it printed.

    The rest of stdout is read through the same buffered reader as `read_until`: lines it has
    already buffered are acknowledgements too (`communicate` would read past them).
    """
    if not itself:
        proc.kill()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += complete_lines(proc.stdout)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_sigkill_at_random_moments_loses_no_acknowledged_write(tmp_path, factory):
    rng = random.Random(f"crash-{factory}")
    path = tmp_path / "idx"
    expected = Expected()
    for run in range(4):
        proc = start_writer(path, run, factory)
        lines: list[str] = []
        if run % 2:  # during an explicit snapshot, a little after it starts
            read_until(proc, "SNAP\n", rng.randint(1, 3), lines)
            time.sleep(rng.uniform(0, 0.01))
        else:  # anywhere: after some acknowledged writes plus a random delay
            read_until(proc, "ACK", rng.randint(3, 25), lines)
            time.sleep(rng.uniform(0, 0.005))
        kill(proc, lines)
        expected.feed(lines)
        expected.check(path)
    assert sum(v is not None for v in expected.version.values()) > 5


def run_dying_writer(path: Path, die_at: int, factory: str = "HNSW8") -> list[str]:
    proc = start_writer(path, 0, factory, 10**6, die_at)
    lines: list[str] = []
    for line in complete_lines(proc.stdout):
        lines.append(line)
        if line.startswith("SNAP DONE"):  # survived its step count: stop it here
            proc.kill()
            break
    kill(proc, lines, itself=True)
    return lines


def still_writable(path: Path) -> None:
    from refrain.index import TrackRecord, open_index

    with open_index(path, IDENTITY) as ix:
        n = len(ix)
        ix.add_track(TrackRecord("after-recovery"), *track_data("after-recovery", 1))
        ix.snapshot()
    with open_index(path, IDENTITY) as ix:
        assert len(ix) == n + 1
        np.testing.assert_array_equal(
            ix.get_vectors("after-recovery")[0], track_data("after-recovery", 1)[0]
        )


@pytest.mark.slow
def test_sigkill_at_each_critical_step_of_a_snapshot(tmp_path):
    """Kill just before chosen fsync/rename/truncate steps of a snapshot (HNSW: it writes
    vectors, segments, tracks, graph, tombstones, manifest, then truncates the journal)."""
    probe = run_dying_writer(tmp_path / "probe", 10**6)
    steps = [
        line.split()[1:] for line in probe[: probe.index("SNAP DONE")] if line.startswith("STEP")
    ]
    names = [" ".join(s[1:]) for s in steps]
    manifest = names.index("replace MANIFEST.json.tmp") + 1
    assert any("ann-" in n for n in names) and "ftruncate" in " ".join(names)
    rng = random.Random(3)
    chosen = sorted(
        {
            rng.randint(1, manifest - 2),
            rng.randint(1, manifest - 2),
            manifest - 1,
            manifest,
            manifest + 1,
            manifest + 2,
            len(steps),
        }
    )
    for step in chosen:
        path = tmp_path / f"idx-{step}"
        lines = run_dying_writer(path, step)
        assert f"STEP {step} " in "\n".join(lines) and "SNAP DONE" not in lines
        expected = Expected()
        expected.feed(lines)
        assert expected.in_flight is None  # the 10 writes before it were all acknowledged
        assert sum(line.startswith("ACK") for line in lines) == 10
        expected.check(path)
        assert not [p.name for p in (path / "snapshot").iterdir() if p.name.endswith(".tmp")]
        still_writable(path)


@pytest.mark.parametrize("writes", [1, 3])
def test_sigkill_after_the_journal_fsync_of_a_write(tmp_path, writes):
    """Durable in the journal but not yet in memory or the catalog: replay completes it."""
    path = tmp_path / "idx"
    proc = start_writer(path, 0, "Flat", 10**6, die_at=-writes)
    lines: list[str] = []
    kill(proc, lines, itself=True)
    expected = Expected()
    expected.feed(lines)
    assert expected.in_flight is not None and len(expected.version) == writes - 1
    tid = expected.in_flight[1]
    expected.check(path)
    assert expected.version[tid] == 1  # the record was fsynced: the write survived
    from refrain.index import open_index

    with open_index(path, IDENTITY) as ix:
        assert len(ix) == writes and ix.get_track(tid).n_segments > 0
