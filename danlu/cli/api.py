"""`danlu api`: serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API."""
from __future__ import annotations

import argparse
from pathlib import Path

from danlu.cli.common import add_config_argument, add_model_options, add_template_option, load_from_args


def add_parser(sub, name):
    parser = sub.add_parser(name, help="OpenAI-compatible API server with continuous batching")
    add_config_argument(parser)
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1 requests")
    parser.add_argument("--served-model-name", "--served_model_name", dest="served_model_name", default=None,
                        help="the model id clients send (default: the model file or directory name)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="serve a LoRA adapter as model NAME (repeatable); requests pick it by `model`")
    add_template_option(parser)
    parser.add_argument("--max-batch", "--max_batch", dest="max_batch", type=int, default=16,
                        help="requests decoded together")
    parser.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=64,
                        help="requests waiting beyond the batch; more get 429")
    parser.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=512,
                        help="default max_tokens of chat completions")
    parser.add_argument("--enable-prefix-caching", dest="prefix_caching", action=argparse.BooleanOptionalAction,
                        default=True, help="keep the keys and values of prompts' beginnings (a system prompt, earlier "
                                           "turns) for the prompts that start the same way (default: on)")
    parser.add_argument("--prefix-cache-mib", "--prefix_cache_mib", dest="prefix_cache_mib", type=float,
                        default=256.0, help="memory the prefix cache may hold, in MiB (default 256)")
    parser.add_argument("--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", type=float,
                        default=30.0, help="on SIGTERM/Ctrl-C, seconds running requests may take to finish before "
                                           "they are aborted")
    parser.set_defaults(run=run)
    return parser


def parse_loras(items: list[str]) -> dict[str, str]:
    loras = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {item!r}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--lora {name}: {path} is not a directory")
        loras[name] = path
    return loras


def build_engine_and_app(args):
    from danlu.serving.api import create_app
    from danlu.serving.engine import Engine
    from danlu.serving.multi_lora import MultiLoRA

    loras = parse_loras(args.lora)
    lm = load_from_args(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; serving needs a checkpoint with one")
    adapters = MultiLoRA.load(lm.model, loras) if loras else None
    engine = Engine(lm.model, lm.tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, adapters=adapters,
                    prefix_cache_mib=args.prefix_cache_mib if args.prefix_caching else 0)
    name = args.served_model_name or Path(lm.source).name.removesuffix(".gguf")
    app = create_app(engine, name, args.template, args.api_key, args.max_tokens)
    return engine, app, name


def run(args) -> int:
    import uvicorn

    engine, app, name = build_engine_and_app(args)
    engine.start()
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    try:  # SIGTERM: uvicorn stops accepting, waits for open requests up to the timeout, then cancels them
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        engine.stop()  # whatever is left is aborted, each client told
    return 0
