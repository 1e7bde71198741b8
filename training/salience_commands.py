"""`refrain salience`: build the labelled cache, train the tune-salience network, measure it.

    refrain salience cache corpus-tunes --out runs/salience/cache.npz
    refrain salience train runs/salience/cache.npz --out runs/salience --steps 1500
    refrain salience evaluate runs/salience/test-cache.npz --checkpoint runs/salience/best \\
        --baseline-on runs/salience/cache.npz --json salience-test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("salience", help="the tune-salience network: cache, train, evaluate")
    s = p.add_subparsers(dest="salience_command", required=True)

    c = s.add_parser("cache", help="the labelled CQT cache of rendered corpus folders")
    c.add_argument("corpus", nargs="+", type=Path, help="folders of `refrain corpus render`")
    c.add_argument("--out", type=Path, required=True, help="the cache (.npz)")
    c.add_argument("--split", action="append", default=None, help="only these splits")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_cache)

    t = s.add_parser("train", help="train (or resume) on a cache's training versions")
    t.add_argument("cache", type=Path)
    t.add_argument("--out", type=Path, required=True, help="run folder (resumed if it exists)")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--frames", type=int, default=128, help="frames per crop (25 a second)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--every", type=int, default=250, help="steps between validations")
    t.add_argument("--channels", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = s.add_parser("evaluate", help="mir_eval melody metrics per texture, with the baseline")
    e.add_argument("cache", type=Path, help="a cache of test versions")
    e.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped network")
    e.add_argument("--split", default=None, help="only versions of this split")
    e.add_argument(
        "--baseline-on",
        type=Path,
        default=None,
        help="a cache whose validation versions choose the top-line baseline's threshold",
    )
    e.add_argument("--json", type=Path, default=None, help="also write the figures here")
    e.set_defaults(func=cmd_evaluate)


def cmd_cache(args: argparse.Namespace) -> int:
    from refrain.training.tune_cache import build_cache

    cache = build_cache(args.corpus, args.out, args.split, progress=not args.quiet)
    print(
        f"{len(cache.tracks)} versions, {cache.hours():.2f} h, "
        f"{args.out.stat().st_size / 2**20:.1f} MiB in {args.out}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from refrain.training.salience_train import SalienceOptions, train_salience

    options = SalienceOptions(
        steps=args.steps,
        batch=args.batch,
        frames=args.frames,
        lr=args.lr,
        every=args.every,
        channels=args.channels,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    history = train_salience(args.cache, args.out, options, progress=not args.quiet)
    print(f"best: {history['best']} -> {args.out / 'best'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from refrain.model.salience import TuneSalience
    from refrain.training.melody_eval import (
        METRICS,
        best_top_line,
        evaluate_estimator,
        network_estimator,
        top_line,
    )
    from refrain.training.tune_cache import TuneCache

    cache = TuneCache.load(args.cache)
    indices = cache.select(args.split)
    net = TuneSalience(args.checkpoint).net
    results = {"network": evaluate_estimator(network_estimator(net), cache, indices)}
    setting = (20.0, 0.35)
    if args.baseline_on is not None:
        tuning = TuneCache.load(args.baseline_on)
        setting, _ = best_top_line(tuning, tuning.select("valid"))
    results["top line"] = evaluate_estimator(top_line(*setting), cache, indices)
    print(f"{len(indices)} versions, {cache.hours(indices):.2f} h; top line at {setting}")
    header = ["estimator", "texture", "versions", *(m.replace("_", " ") for m in METRICS)]
    print(" | ".join(header))
    for name, groups in results.items():
        for group, m in groups.items():
            cells = [name, group, str(m["versions"]), *(f"{m[k]:.3f}" for k in METRICS)]
            print(" | ".join(cells))
    if args.json is not None:
        args.json.write_text(json.dumps({"baseline": setting, **results}, indent=1))
    return 0
