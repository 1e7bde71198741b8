"""How long `refrain -h` and `refrain COMMAND -h` take: the wall time of a fresh process, as a
user at a shell waits for it (interpreter start included), median of a few runs.

    python bench/cli_help.py
    python bench/cli_help.py --runs 9 --command=-h --command="corpus render -h"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time

COMMANDS = (
    "-h",
    "serve -h",
    "embed -h",
    "ingest -h",
    "index build -h",
    "evaluate -h",
    "train -h",
    "corpus render -h",
)


def time_command(argv: list[str], runs: int) -> float:
    """Median seconds of `python -m refrain.service.cli ARGV` over `runs` fresh processes."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "refrain.service.cli", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_command_python(runs: int) -> float:
    """The interpreter's own start, for scale."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per command")
    parser.add_argument("--command", action="append", help="arguments after `refrain`")
    args = parser.parse_args(argv)
    baseline = time_command_python(args.runs)
    rows = []
    print(f"{'command':24s} {'median s':>9s}")
    print(f"{'(python -c pass)':24s} {baseline:9.3f}")
    for command in args.command or COMMANDS:
        seconds = time_command(shlex.split(command), args.runs)
        rows.append((command, seconds))
        print(f"{'refrain ' + command:24s} {seconds:9.3f}")
    return rows


if __name__ == "__main__":
    main()
