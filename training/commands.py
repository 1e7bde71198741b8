"""Training subcommands of `refrain`: evaluate, train, calibrate and the corpus's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refrain.training import salience_commands
from refrain.training.corpus import commands as corpus_commands


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="track- and segment-level retrieval metrics on a manifest")
    p.add_argument("--manifest", required=True, help="CSV with columns clique,path")
    p.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    p.add_argument("--reduction", default="bpwr-10", help="track-level reduction")
    p.add_argument(
        "--query-seconds", default="5,10,20,30", help="segment query lengths ('' for none)"
    )
    p.add_argument("--hop", type=float, default=5.0, help="seconds between segments")
    p.add_argument(
        "--queries-per-track", type=int, default=1, help="random segment queries per track"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the segment query offsets")
    p.add_argument("--segment-reduction", default="min", help="segment-level reduction")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="seconds of each track evaluated, from its start (0: all)",
    )
    p.add_argument("--max-tracks", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--split", default=None, help="only rows of this split (e.g. test)")
    p.add_argument(
        "--baseline",
        nargs="?",
        const="2dftm",
        default=None,
        choices=("2dftm", "qmax", "qmax-upper", "qmax-tune", "random"),
        help="evaluate a training-free baseline instead of a model: chroma 2DFTM "
        "segments (the default), Qmax chroma alignment (needs librosa), or Qmax on the "
        "upper chroma (refrain.model.sequence.UPPER), or Qmax on the tune chroma that "
        "verification aligns (refrain.model.sequence.TUNE: the tune-salience network's), or a "
        "random ranking (chance, for the floor)",
    )
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="C",
        help="also report each level with the model's C nearest tracks re-ranked by Qmax "
        "alignment fused with the distance (alignment verification, e.g. 100; needs the train "
        "extra)",
    )
    p.add_argument(
        "--verify-weight",
        type=float,
        default=2.4,
        help="weight of the alignment in the fusion (refrain.search.fusion)",
    )
    p.add_argument(
        "--verify-expand",
        type=float,
        default=0.5,
        help="weight of the expansion with the first verified track (refrain.search.fusion)",
    )
    p.add_argument(
        "--verify-on",
        choices=("tune", "upper"),
        default="tune",
        help="the chroma verification aligns: the tune's (refrain.model.sequence.TUNE, as the "
        "service does) or the upper chroma (UPPER, as indexes built before the tune do)",
    )
    p.add_argument(
        "--verify-sweep",
        action="store_true",
        help="also report every level re-ranked with each number of candidates up to "
        "--verify and each weight of refrain.search.fusion's sweep (to choose them on "
        "validation queries)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes scoring Qmax pairs (default: the CPUs available)",
    )
    p.add_argument(
        "--served",
        action="store_true",
        help="also run every track and clip through the service's own search (a temporary "
        "index, the REFRAIN_* settings) and print its table beside this one",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--per-query", action="store_true", help="include per-query arrays in --json")
    p.set_defaults(func=cmd_evaluate)

    add_train(sub)

    corpus_commands.add_commands(sub)
    salience_commands.add_commands(sub)

    p = sub.add_parser("calibrate", help="fit a model's score calibration on validation pairs")
    p.add_argument("model", help="Refrain model folder (its calibration is written into it)")
    p.add_argument("--manifest", required=True, help="CSV with clique,path,split")
    p.add_argument("--split", default="valid")
    p.add_argument(
        "--target-precision",
        type=float,
        default=None,
        help="operating point: the largest distance reaching this precision (default: the best F1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CLEWS model from a clique,path manifest")
    p.add_argument("config", help="YAML run configuration (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a configuration value, e.g. training.epochs=2",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from refrain.training.train import RunConfig, train

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot):
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    best = train(RunConfig.from_dict(raw))
    print(f"best checkpoint: {best}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json

    from refrain.training.calibrate import calibrate_model

    cal = calibrate_model(args.model, args.manifest, args.split, args.target_precision, args.seed)
    print(json.dumps(cal.to_dict(), indent=1))
    return 0


def _parse_seconds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"expected comma-separated query lengths in seconds such as '5,10,20,30', got {text!r}"
        ) from None


def _cost_line(cost: dict) -> str:
    """E.g. 'qmax: 162,000 pairs in 95.0 s, 0.59 ms per pair (2 processes, 1.1 ms of CPU
    per pair)': wall time, then process time summed over the scoring processes."""
    return (
        f"{cost['scorer']}: {cost['pairs']:,} pairs in {cost['wall_s']:.1f} s, "
        f"{cost['ms_per_pair']:.3g} ms per pair ({cost['workers']} processes, "
        f"{cost['cpu_ms_per_pair']:.3g} ms of CPU per pair)"
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`refrain evaluate`: print the table and counts, write JSON if asked.

    Returns 0, or 1 when some files could not be decoded (the results then cover the rest).
    """
    import json
    import time

    from refrain.model import load_model
    from refrain.training.evaluate import (
        EvalOptions,
        TrackEncoder,
        evaluate_detailed,
        read_manifest,
    )
    from refrain.training.retrieval_metrics import format_table

    start = time.perf_counter()
    items = read_manifest(args.manifest, split=args.split)
    if args.max_tracks is not None:
        if args.max_tracks < 1:
            raise ValueError(f"expected --max-tracks >= 1, got {args.max_tracks}")
        items = items[: args.max_tracks]
    options = EvalOptions(
        reduction=args.reduction,
        segment_reduction=args.segment_reduction,
        query_seconds=_parse_seconds(args.query_seconds),
        hop=args.hop,
        queries_per_track=args.queries_per_track,
        seed=args.seed,
        max_seconds=args.max_seconds or None,
        verify=args.verify,
        verify_weight=args.verify_weight,
        verify_expand=args.verify_expand,
        verify_tune=getattr(args, "verify_on", "tune") == "tune",
        verify_sweep=getattr(args, "verify_sweep", False),
    )
    baseline = getattr(args, "baseline", None)
    model: TrackEncoder
    if baseline is True or baseline == "2dftm":  # True: the former on/off flag
        from refrain.training.baseline import ChromaBaseline

        model = ChromaBaseline()
    elif baseline == "random":
        from refrain.training.baseline import RandomScorer

        model = RandomScorer(options.seed)
    elif baseline in ("qmax", "qmax-upper", "qmax-tune"):
        from refrain.model.qmax import QmaxParams, QmaxScorer
        from refrain.model.sequence import TUNE, UPPER

        params = {"qmax-upper": UPPER, "qmax-tune": TUNE}.get(baseline, QmaxParams())
        try:
            model = QmaxScorer(params, workers=getattr(args, "jobs", None))
        except ImportError as e:  # librosa is in the train extra
            raise ValueError(str(e)) from None
    elif baseline is not None:
        raise ValueError(
            f"unknown baseline {baseline!r}; expected 2dftm, qmax, qmax-upper, qmax-tune or random"
        )
    else:
        model = load_model(args.checkpoint, device=args.device)
    ev = evaluate_detailed(model, items, options, progress=True)
    wall = time.perf_counter() - start
    for i, err in ev.skipped:
        print(f"skipped (cannot decode): {items[i].path}: {err}", file=sys.stderr)
    print(format_table(ev.results))
    print(ev.summary())
    if ev.pairwise is not None:
        print(_cost_line(ev.pairwise))
    if ev.verification is not None:
        print(_cost_line({"scorer": "verification", **ev.verification}))
    served = None
    if getattr(args, "served", False):
        from refrain.model.embedder import Embedder
        from refrain.training.served import evaluate_served, side_by_side

        if not isinstance(model, Embedder):
            raise ValueError("--served evaluates the model the service runs, not a baseline")
        served = evaluate_served(model, items, options, progress=True)
        print(format_table(served.results))
        print(side_by_side(options, ev.results, served.results))
        print(f"served search: {served.settings}; wall time {served.wall_s:.1f} s")
        if served.refused:
            print(f"queries the service refused (ranked in random order): {served.refused}")
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if args.json:
        out = ev.to_dict(per_query=args.per_query)
        if served is not None:
            out["served"] = served.to_dict()
        out["settings"].update(manifest=str(args.manifest), checkpoint=args.checkpoint)
        out["wall_s"] = wall
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if ev.skipped else 0
