"""Ablation: losses x positive reductions, each trained on the same budget, same data.

For every (loss, positive reduction) pair this trains a model from the same configuration
and seed for the same number of steps, then evaluates it on the test works with the
paper's protocol (track-level MAP/NAR with bpwr-10, segment-level MAP for 5/10/20/30 s
queries with min). Results go to a JSON file and a markdown table.

    python bench/ablation.py configs/ablation.yaml --steps 100 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from refrain.model import load_model
from refrain.training.evaluate import evaluate, read_manifest
from refrain.training.losses import LOSSES
from refrain.training.train import RunConfig, train

REDUCTIONS = ("bpwr-5", "meanmin", "min")
TAUS = (5.0, 10.0, 20.0, 30.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="base YAML run configuration")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (the budget)")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--reductions", default=",".join(REDUCTIONS))
    p.add_argument("--split", default="test", help="manifest split evaluated")
    args = p.parse_args()

    base = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    items = read_manifest(base["data"]["manifest"], split=args.split)
    steps_per_epoch = max(1, min(args.steps, base["training"].get("steps_per_epoch", 50)))

    for loss in args.losses.split(","):
        for pos in args.reductions.split(","):
            name = f"{loss}/{pos}"
            if name in results:  # resumable: finished runs are kept
                continue
            raw = json.loads(json.dumps(base))
            raw["loss"] = {**raw.get("loss", {}), "name": loss, "pos": pos}
            raw["training"].update(
                out=str(out / loss / pos),
                steps_per_epoch=steps_per_epoch,
                epochs=max(1, args.steps // steps_per_epoch),
            )
            t0 = time.monotonic()
            best = train(RunConfig.from_dict(raw))
            model = load_model(best)
            res = evaluate(model, items, query_seconds=TAUS)
            results[name] = {
                "train_minutes": (time.monotonic() - t0) / 60,
                **{k: v.to_dict() for k, v in res.items()},
            }
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name}: done", flush=True)

    (out / "table.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    head = (
        "| loss | positive reduction | track MAP | track NAR % | "
        + " | ".join(f"seg {t:g} s MAP" for t in TAUS)
        + " |"
    )
    lines = [head, "|" + " --- |" * (4 + len(TAUS))]
    for name, r in results.items():
        loss, pos = name.split("/")
        track = next(v for k, v in r.items() if k.startswith("track"))
        segs = [
            next((v for k, v in r.items() if k.startswith(f"segment {t:g} s")), None) for t in TAUS
        ]
        cells = [f"{s['map']['mean']:.3f}" if s else "-" for s in segs]
        lines.append(
            f"| {loss} | {pos} | {track['map']['mean']:.3f} | "
            f"{track['nar']['mean']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
