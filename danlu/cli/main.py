"""`danlu SUBCOMMAND ...`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from danlu.cli import api, chat, convert, evaluate, export, fetch, generate, model_info, reward, train, vocab, webui
from danlu.utils.progress import configure_logging

SUBCOMMANDS = {
    "train": train,
    "export": export,
    "chat": chat,
    "api": api,
    "webui": webui,
    "generate": generate,
    "eval": evaluate,
    "reward": reward,
    "convert": convert,
    "vocab": vocab,
    "model-info": model_info,
    "fetch-default-model": fetch,
}


def build_parser(defaults: Optional[dict[str, dict]] = None) -> argparse.ArgumentParser:
    """The command line's parser; `defaults` maps a subcommand to option defaults (those of its CONFIG.yaml)."""
    parser = argparse.ArgumentParser(prog="danlu", description="丹炉: train, compress, convert and serve LLMs")
    parser.add_argument("--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        command = module.add_parser(sub, name)
        if defaults and name in defaults:
            command.set_defaults(**defaults[name])
    return parser


# These take LLaMA-Factory-style `[CONFIG.yaml] --key value ...` parsed by danlu.training.arguments.
RAW_ARGUMENT_COMMANDS = ("train", "export")


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in RAW_ARGUMENT_COMMANDS:
        configure_logging(False)
        return argparse.Namespace(command=argv[0], verbose=False, argv=argv[1:], run=SUBCOMMANDS[argv[0]].run)
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if getattr(args, "config", None) is None:
        return args
    from danlu.cli.common import apply_config

    return apply_config(args, lambda defaults: build_parser({args.command: defaults}).parse_args(argv))


def reported_errors() -> tuple[type, ...]:
    """The errors a command reports as one line (bad input, a stopped run); imported only when one is raised,
    so that no command pays for the modules that define them."""
    from danlu.checkpoints.errors import CheckpointError
    from danlu.distributed.failures import LostProcess
    from danlu.generation.generate import ContextOverflow
    from danlu.training.loop import TrainingStopped

    return CheckpointError, ContextOverflow, TrainingStopped, LostProcess, ValueError, KeyError, FileNotFoundError


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parse_command_line(argv)
        return args.run(args) or 0
    except Exception as e:
        if not isinstance(e, reported_errors()):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"danlu {command}: error: {message}", file=sys.stderr)
        return 2


def run() -> None:
    """The `danlu` command and `python -m danlu`: main(), then exit with its code."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # torch 2.13's gloo can abort a finished rank during interpreter teardown (about 1 run in 12 measured),
        # turning a completed torchrun job into a failed one; the work and its files are done and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
