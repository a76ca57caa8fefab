"""`danlu webui`: chat with a model (and its LoRA adapters) in the browser, on loopback by default."""
from __future__ import annotations

import os

from danlu.cli.api import parse_loras
from danlu.cli.common import (add_config_argument, add_model_options, add_sampling_options, load_from_args,
                              sampling_config)
from danlu.generation.sampling import GenerationConfig


def add_parser(sub, name):
    parser = sub.add_parser(name, help="chat in the browser (gradio), choosing a LoRA adapter per answer "
                                       "(LLaMA-Factory's webchat)")
    add_config_argument(parser)
    add_model_options(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="offer a LoRA adapter as NAME in the page's adapter choice (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    # --template, --system and the sampling settings; the sampling ones are the page's starting values.
    add_sampling_options(parser, GenerationConfig())
    parser.set_defaults(run=run, seed=None)  # no fixed seed by default, so Regenerate gives a new answer
    return parser


def run(args) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no internet: no telemetry, no version check
    config = sampling_config(args)  # invalid settings fail before the model loads
    loras = parse_loras(args.lora)
    from danlu.serving.webui import BASE, build_webui, offline_theme

    if BASE in loras:
        raise ValueError(f"--lora {BASE}=...: {BASE!r} is the page's name for the model without an adapter")
    lm = load_from_args(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; the web chat needs a checkpoint with one")
    multi = None
    if loras:
        from danlu.serving.multi_lora import MultiLoRA
        from danlu.tuning.lora import merge_lora

        if args.adapter:  # --adapter becomes part of the base, so the --lora adapters wrap plain linears
            merge_lora(lm.model)
        multi = MultiLoRA.load(lm.model, loras)
    demo = build_webui(lm, multi, args.template, config=config, system=args.system)
    print(f"danlu webui: http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        demo.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                            show_error=True, ssr_mode=False, mcp_server=False, theme=offline_theme(),
                            footer_links=["settings"], quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        demo.handlers.close()
    return 0
