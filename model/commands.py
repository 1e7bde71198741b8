"""Model subcommands of `refrain`: embed, convert, interpolate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed audio files into per-segment .npy arrays")
    p.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (mirrors the input layout)")
    p.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    p.add_argument("--hop", type=float, default=5.0, help="seconds between segments")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=32, help="segments per network call")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("convert", help="convert an official CLEWS checkpoint to Refrain's format")
    p.add_argument("checkpoint", help="official checkpoint (.ckpt with configuration.yaml beside)")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "interpolate", help="mix the weights of two models of one configuration into a third"
    )
    p.add_argument("a", help="Refrain model folder or official checkpoint (weight 0)")
    p.add_argument("b", help="the other model (weight 1)")
    p.add_argument("out", help="output folder")
    p.add_argument("--weight", type=float, default=0.5, help="share of b, in [0, 1]")
    p.set_defaults(func=cmd_interpolate)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from refrain.model import load_model
    from refrain.model.audio import AUDIO_EXTENSIONS, find_audio

    files = find_audio(args.inputs)
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {args.inputs}")
    model = load_model(args.checkpoint, device=args.device)
    out = Path(args.out)
    zs = model.embed_many(
        [f for f, _ in files],
        hop=args.hop,
        batch_size=args.batch_size,
        progress=True,
        errors="skip",
    )
    failed = 0
    for (src, rel), z in zip(files, zs, strict=False):
        if z is None:
            print(f"skipped (cannot decode): {src}", file=sys.stderr)
            failed += 1
            continue
        dst = (out / rel).with_suffix(".npy")
        dst.parent.mkdir(parents=True, exist_ok=True)
        np.save(dst, z)
    print(f"wrote {len(files) - failed} embeddings to {out} ({failed} failed)")
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from refrain.model.checkpoint import convert

    out = convert(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from refrain.model.checkpoint import interpolate

    out = interpolate(args.a, args.b, args.weight, args.out)
    print(f"wrote {out} ({args.weight:g} of {args.b}); refit its calibration: refrain calibrate")
    return 0
