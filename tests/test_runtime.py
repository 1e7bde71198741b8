"""The runtime's FAISS thread setting: searches run with `search_threads` OpenMP threads."""

from __future__ import annotations

import io
import threading

import faiss
import pytest
import soundfile as sf

from refrain.service.engine import omp_threads
from refrain.service.settings import Settings

from conftest import CKPT_A, DATA, LiveServer


def in_fresh_thread(fn):
    """fn() on a new thread, like a request thread: OpenMP keeps its thread count per thread."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def wav(seconds: float, offset: float = 0.0) -> bytes:
    x, sr = sf.read(
        DATA / "audio" / "song75s.flac",
        dtype="float32",
        start=int(offset * 44100),
        frames=int(seconds * 44100),
    )
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV")
    return buf.getvalue()


def test_searches_run_with_the_configured_faiss_threads(tmp_path):
    default = in_fresh_thread(faiss.omp_get_max_threads)
    server = LiveServer(
        Settings(data_dir=tmp_path / "data", model=str(CKPT_A), api_keys="k1", search_threads=1)
    )
    try:
        runtime = server.app.state.runtime
        seen = []
        real = runtime.engine.store.search

        def search(*args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            return real(*args, **kwargs)

        runtime.engine.store.search = search
        with server.client(headers={"Authorization": "Bearer k1"}) as c:
            r = c.post("/v1/tracks", files={"audio": ("t.wav", wav(30))}, data={"track_id": "t"})
            assert r.status_code == 201, r.text
            clip = {"audio": ("q.wav", wav(10, offset=8))}
            for threads, expected in ((1, 1), (3, 3), (0, default)):
                runtime.settings.search_threads = threads
                seen.clear()
                r = c.post("/v1/search", files=clip)
                assert r.status_code == 200, r.text
                assert r.json()["results"][0]["track_id"] == "t"
                assert seen and set(seen) == {expected}, (threads, seen)
    finally:
        server.stop()


def test_omp_threads_is_scoped_to_the_block():
    def scoped():
        default = faiss.omp_get_max_threads()
        with omp_threads(3):
            inside = faiss.omp_get_max_threads()
        with omp_threads(0):
            untouched = faiss.omp_get_max_threads()
        return default, inside, untouched, faiss.omp_get_max_threads()

    default, inside, untouched, after = in_fresh_thread(scoped)
    assert (inside, untouched, after) == (3, default, default)


@pytest.mark.parametrize("name", ["search_threads", "job_retention_hours", "min_free_bytes"])
def test_negative_settings_are_refused(name, monkeypatch):
    with pytest.raises(ValueError, match=name):
        Settings(**{name: -1})
    monkeypatch.setenv(f"REFRAIN_{name.upper()}", "-1")
    with pytest.raises(ValueError, match=name):
        Settings()
    monkeypatch.setenv(f"REFRAIN_{name.upper()}", "2")
    assert getattr(Settings(), name) == 2


def test_defaults():
    s = Settings()
    assert (s.search_threads, s.job_retention_hours, s.min_free_bytes) == (1, 168.0, 1 << 30)


CHROMA_IN_A_THREAD = """
import threading, sys
import numpy as np
import torch  # first, as the service loads it: FAISS then shares torch's OpenMP runtime
import faiss
from refrain.model.sequence import Chromagram
from refrain.service.engine import same_omp_threads

chromagram, noise = Chromagram(), np.random.default_rng(0).standard_normal(160_000)
torch.set_num_threads(1)
seen = []

def request(wrap):
    before = faiss.omp_get_max_threads()
    if wrap:
        with same_omp_threads():
            chromagram.query(noise.astype(np.float32))
    else:
        chromagram.query(noise.astype(np.float32))
    seen.append((wrap, before, faiss.omp_get_max_threads()))

for wrap in (False, True):
    t = threading.Thread(target=request, args=(wrap,))
    t.start()
    t.join()
print(seen)
"""


def test_the_chroma_step_leaves_the_request_threads_openmp_setting_alone():
    """A thread's first torch convolution sets its OpenMP thread count to torch's, and FAISS
    shares torch's OpenMP runtime when torch is loaded first: the search after the chroma
    step ran with torch's count (1 after `torch.set_num_threads(1)`), not the configured one.
    `same_omp_threads` keeps the thread's count (checked in a process that loads torch
    first; the unwrapped call shows whether this platform shares the runtime)."""
    import ast
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", CHROMA_IN_A_THREAD], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = {wrap: (before, after) for wrap, before, after in ast.literal_eval(out.stdout)}
    before, after = seen[True]
    assert before == 2 and after == before, seen
