"""Options shared by several subcommands, and loading the model they name."""
from __future__ import annotations

import argparse

from danlu.checkpoints.bundled import bundled_model_path
from danlu.generation.sampling import GenerationConfig


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help=f"a .gguf file, a Hugging Face directory or hub id, or a preset "
                             f"(default: the bundled SmolLM2-135M-Instruct at {bundled_model_path()})")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (float32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--hub", default=None, choices=["huggingface", "modelscope"],
                        help="where hub ids are downloaded from (default: $DANLU_HUB or huggingface)")
    parser.add_argument("--adapter", "--adapter_name_or_path", dest="adapter", default=None,
                        help="a LoRA adapter directory (PEFT format) used unmerged; comma-separated for several")


def add_sampling_options(parser: argparse.ArgumentParser, defaults: GenerationConfig) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="0 disables")
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--template", default=None,
                        help="chat template: qwen | chatml | llama2 | llama3 | alpaca | default "
                             "(default: the model's own)")
    parser.add_argument("--system", default=None, help="system prompt")


def sampling_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop))


def load_from_args(args, show_progress: bool = True):
    from danlu.checkpoints.load import load_pretrained

    lm = load_pretrained(args.model, dtype=args.dtype, device=args.device, hub=args.hub,
                         show_progress=show_progress)
    if getattr(args, "adapter", None):
        from danlu.tuning.lora import load_adapter, merge_lora

        adapters = [a.strip() for a in args.adapter.split(",") if a.strip()]
        for i, adapter in enumerate(adapters):
            if i:  # earlier adapters are folded in so the next one wraps plain linears
                merge_lora(lm.model)
            load_adapter(lm.model, adapter)
    return lm

