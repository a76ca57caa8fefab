"""`danlu eval --task perplexity --input TEXT --ctx 512`."""
from __future__ import annotations

import json
from pathlib import Path

from danlu.cli.common import add_model_options, load_from_args

TASKS = ("perplexity",)


def add_parser(sub, name):
    parser = sub.add_parser(name, help="evaluate a model (perplexity over a text file)")
    add_model_options(parser)
    parser.add_argument("--task", default="perplexity", choices=TASKS)
    parser.add_argument("--input", required=True, help="a UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def run(args) -> int:
    from danlu.evaluation.perplexity import perplexity

    text = read_text(args.input)
    lm = load_from_args(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; perplexity needs a checkpoint with one")
    ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    result = perplexity(lm.model, ids, args.ctx, show_progress=True)
    if args.json:
        print(json.dumps(vars(result)))
    else:
        print(f"mean NLL   {result.nll:.6f}\nperplexity {result.perplexity:.4f}\n"
              f"tokens     {result.tokens} predicted in {result.windows} window(s) of {args.ctx}")
    return 0
