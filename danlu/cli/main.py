"""`danlu SUBCOMMAND ...`: a thin shell over the Python API."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional

from danlu.cli import (api, chat, convert, evaluate, export, factorize, fetch, generate, model_info, prune, quantize,
                       reward, train, vocab, webui)
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
    "quantize": quantize,
    "prune": prune,
    "factorize": factorize,
    "vocab": vocab,
    "model-info": model_info,
    "fetch-default-model": fetch,
}

# On every command line, for every command: the error's traceback besides its one line.
DEBUG_FLAG = "--debug"


def build_parser(defaults: Optional[dict[str, dict]] = None) -> argparse.ArgumentParser:
    """The command line's parser; `defaults` maps a subcommand to option defaults (those of its CONFIG.yaml)."""
    parser = argparse.ArgumentParser(prog="danlu", description="丹炉: train, compress, convert and serve LLMs")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, print its traceback too (any command; anywhere on the line)")
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
    """The errors a command reports as one line (bad input, a stopped run, what the system refused: a file
    missing or not writable, a full disk, out of memory); imported only when one is raised, so that no command
    pays for the modules that define them."""
    import torch

    from danlu.checkpoints.errors import CheckpointError
    from danlu.distributed.failures import LostProcess
    from danlu.generation.generate import ContextOverflow
    from danlu.training.loop import TrainingStopped

    return (CheckpointError, ContextOverflow, TrainingStopped, LostProcess, ValueError, KeyError, OSError,
            MemoryError, torch.OutOfMemoryError)


def describe(error: BaseException) -> str:
    """The error's message on one line; an OSError from the system as `FILE: what` (not `[Errno N] ...`)."""
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror:
        files = [str(f) for f in (error.filename, error.filename2) if f is not None]
        message = f"{' -> '.join(files)}: {error.strerror}" if files else error.strerror
    else:
        message = str(error) or type(error).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


def report(error: Exception, command: str, debug: bool) -> int:
    """One line on stderr for a failed command (after the traceback with --debug): bad input and what the
    system refused exit 2; anything else is a bug in danlu, said so, and exits 1."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    where = f"danlu {command}" if command else "danlu"
    try:
        expected = isinstance(error, reported_errors())
    except Exception:  # a module of reported_errors() failing to import is itself the bug to report
        expected = False
    if expected:
        print(f"{where}: error: {describe(error)}", file=sys.stderr)
        return 2
    hint = "" if debug else f" (run with {DEBUG_FLAG} for the traceback)"
    print(f"{where}: internal error: {type(error).__name__}: {describe(error)}{hint}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    """Run a command line; its exit code: 0 done, 2 bad input (or a file, the disk or memory refused), 1 a bug.
    `--debug` anywhere on the line (taken out before the command parses it) adds the error's traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parse_command_line(argv)
        return args.run(args) or 0
    except Exception as e:
        return report(e, command, debug)


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
