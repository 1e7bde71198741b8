"""Every ```python block of the README, and of the API page of the docs, runs as it is written.

Each block runs in its own interpreter (twice where it writes an index), in a temporary
folder holding the files the pages name: `song.flac` (a synthetic song), `clip.wav` (20 s cut
from it) and `dvi-clews/checkpoint_best.ckpt` (the official-format fixture checkpoint,
standing in for a published one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from helpers import SR, synth_song

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, ROOT / "docs" / "api.md")  # the pages whose ```python blocks must run
OFFICIAL = Path(__file__).parent / "data" / "clews-official-A"

BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a page."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


BLOCKS = [
    (page.relative_to(ROOT).as_posix(), *block) for page in PAGES for block in python_blocks(page)
]


def test_readme_has_python_blocks():
    assert len(python_blocks(README)) >= 2, "README.md lost its library examples"


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """The audio the README's examples read, written once for all blocks."""
    folder = tmp_path_factory.mktemp("readme-audio")
    song = synth_song(45.0, seed=7)
    sf.write(folder / "song.flac", song, SR)
    sf.write(folder / "clip.wav", song[20 * SR : 40 * SR], SR)
    return folder


@pytest.mark.parametrize(
    ("page", "line", "code"), BLOCKS, ids=[f"{page}:line{n}" for page, n, _ in BLOCKS]
)
def test_readme_block_runs(page, line, code, audio_dir, tmp_path):
    for name in ("song.flac", "clip.wav"):
        (tmp_path / name).symlink_to(audio_dir / name)
    checkpoint = tmp_path / "dvi-clews"
    checkpoint.mkdir()
    for name in ("checkpoint_best.ckpt", "configuration.yaml"):
        (checkpoint / name).symlink_to(OFFICIAL / name)
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    # a block that writes an index runs twice: a reader who runs an example again gets no error
    for run in range(2 if "open_index(" in code else 1):
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, (
            f"{page} block at line {line} failed (run {run + 1}):\n{code}\n--- stdout\n"
            f"{done.stdout}\n--- stderr\n{done.stderr}"
        )
