"""The `refrain` command: one entry point, subcommands registered by each package."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from refrain.model import commands as model_commands
from refrain.service import ingest_commands
from refrain.training import commands as training_commands


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (model + index in one process)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data", default=None, help="data folder (index, jobs); default ./data")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--open-writes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow writes without an API key (default: yes on loopback without API keys)",
    )
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from refrain.service.app import create_app
    from refrain.service.settings import Settings

    overrides = {
        k: v
        for k, v in {"data_dir": args.data, "model": args.model, "device": args.device}.items()
        if v is not None
    }
    settings = Settings(**overrides)
    log = logging.getLogger("refrain")
    if args.open_writes is not None:
        settings = settings.model_copy(update={"open_writes": args.open_writes})
    elif not settings.keys and _is_loopback(args.host):
        settings = settings.model_copy(update={"open_writes": True})
    if settings.open_writes:
        log.warning("writes are open without an API key (loopback, no REFRAIN_API_KEYS set)")
    elif not settings.keys:
        log.warning("no REFRAIN_API_KEYS set: writes are refused until keys are configured")
    if settings.keys and settings.reads_open:
        log.warning("searches and reads are open without an API key (REFRAIN_OPEN_READS=true)")
    log.info(
        "serving on http://%s:%d, data in %s", args.host, args.port, settings.data_dir.resolve()
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run an inference worker (model only) for `serve` to call")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    import uvicorn

    from refrain.service.settings import Settings
    from refrain.service.worker_app import create_worker_app

    overrides = {
        k: v for k, v in {"model": args.model, "device": args.device}.items() if v is not None
    }
    settings = Settings(**overrides)
    if not settings.worker_token and not _is_loopback(args.host):
        logging.getLogger("refrain").warning(
            "no REFRAIN_WORKER_TOKEN set: anyone who reaches %s:%d can use this worker",
            args.host,
            args.port,
        )
    uvicorn.run(create_worker_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refrain", description="Find musical versions of audio clips (CLEWS embeddings)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(sub)
    add_worker(sub)
    model_commands.add_commands(sub)
    training_commands.add_commands(sub)
    ingest_commands.add_commands(sub)
    return parser


# optional dependencies -> the extra that installs them
EXTRAS = {
    "music21": "train",
    "mido": "train",
    "librosa": "train",
    "mir_eval": "train",
    "pymilvus": "milvus",
    "milvus_lite": "milvus",
}


# libraries whose INFO lines are noise to an operator: faiss's loader reports which CPU
# build it tried, httpx one line per request (inside `refrain ingest`'s progress bar)
QUIET = ("faiss", "faiss.loader", "httpx", "httpcore")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:  # an optional dependency: one line saying which extra
        root = (e.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        print(
            f"refrain {args.command}: needs {root}, which the {EXTRAS[root]!r} extra installs: "
            f"pip install 'refrain[{EXTRAS[root]}]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as e:  # expected user-facing failures: no traceback
        print(f"refrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
