"""`refrain -h` and every `refrain COMMAND -h` answer from argparse alone: no torch, FAISS,
FastAPI, music21 or NumPy is imported before the arguments are parsed."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "faiss", "fastapi", "music21", "numpy", "scipy", "av", "soundfile", "httpx")

# Builds the parser, then asks every command and action for its help, as -h does, and prints
# the commands seen and the heavy modules loaded.
WALK = f"""
import argparse, contextlib, io, sys
from refrain.service.cli import build_parser, main

def commands(parser, prefix):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + [name]
                yield from commands(sub, prefix + [name])

seen = [[]] + list(commands(build_parser(), []))
for argv in seen:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv + ["-h"])
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: refrain" in out.getvalue(), argv
print(" ".join("/".join(a) for a in seen[1:]))
print(" ".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""


def test_help_of_every_command_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", WALK], capture_output=True, text=True, check=True, timeout=120
    )
    seen, loaded = [*out.stdout.splitlines(), ""][:2]
    assert {"serve", "embed", "ingest", "index/build", "corpus/render", "evaluate"} <= set(
        seen.split()
    )
    assert loaded == "", f"imported before the arguments were parsed: {loaded}"


def test_the_entry_point_answers_help():
    out = subprocess.run(
        [sys.executable, "-m", "refrain.service.cli", "index", "build", "-h"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "usage: refrain index build" in out.stdout, out.stderr
