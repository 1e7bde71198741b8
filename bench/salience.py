"""How fast the tune-salience network runs on the CPU, as a multiple of real time.

    python bench/salience.py                      # 1 and 2 threads, 60 s of audio
    python bench/salience.py --seconds 300 --threads 2

Times, for one clip of `--seconds` of audio, the network alone (from its CQT features) and
the whole tune read (`Chromagram.cqt` then the network then the tune chroma and contour), the
median of `--runs` runs after a warm-up. The audio is noise: the network's cost does not
depend on what it hears.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from refrain.model.salience import default_salience, features
from refrain.model.sequence import CONTOUR_RATE, SEQUENCE_RATE, TUNE, Chromagram


def median_s(fn: Callable[[], None], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, action="append", default=None)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    wave = np.random.default_rng(0).normal(0, 0.1, int(args.seconds * 16000)).astype(np.float32)
    chromagram = Chromagram()
    salience = default_salience()
    cqt = chromagram.cqt(wave)
    feats = features(cqt).unsqueeze(0)
    print(f"{args.seconds:g} s of audio; CQT {cqt.shape[1]} frames, features {feats.shape[-1]}")
    print("threads | network alone | x real time | CQT + network + chroma + contour | x real time")
    for threads in args.threads or [1, 2]:
        torch.set_num_threads(threads)

        def network() -> None:
            with torch.inference_mode():
                salience.net(feats)

        def whole() -> None:
            c = chromagram.cqt(wave)
            chromagram._sequences(c, (SEQUENCE_RATE,), (TUNE,), contour=True)

        a, b = median_s(network, args.runs), median_s(whole, args.runs)
        print(
            f"{threads} | {a * 1000:.1f} ms | {args.seconds / a:.0f} | {b * 1000:.1f} ms | "
            f"{args.seconds / b:.0f}"
        )
    print(f"(contour at {CONTOUR_RATE:g} frames/s, tune chroma at {SEQUENCE_RATE:g})")


if __name__ == "__main__":
    main()
