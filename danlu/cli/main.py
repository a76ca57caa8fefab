"""`danlu SUBCOMMAND ...`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import sys

from danlu.cli import chat, convert, evaluate, fetch, generate, model_info
from danlu.utils.progress import configure_logging

SUBCOMMANDS = {
    "chat": chat,
    "generate": generate,
    "eval": evaluate,
    "convert": convert,
    "model-info": model_info,
    "fetch-default-model": fetch,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="danlu", description="丹炉: train, compress, convert and serve LLMs")
    parser.add_argument("--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from danlu.checkpoints.errors import CheckpointError
    from danlu.generation.generate import ContextOverflow

    try:
        return args.run(args) or 0
    except (CheckpointError, ContextOverflow, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"danlu {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
