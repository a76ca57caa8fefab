"""Options shared by several subcommands, LLaMA-Factory's model and inference keys, and loading the model."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from danlu.checkpoints.bundled import bundled_model_path
from danlu.generation.sampling import GenerationConfig
from danlu.tokenization.templates import TEMPLATES, get_template
from danlu.training.arguments import (ArgumentError, check_choice, check_refused, ignored, parse_arguments,
                                      refused)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The model a command transforms, as its first positional argument (the bundled model when omitted)."""
    parser.add_argument("model", nargs="?", default=None,
                        help=f"Hugging Face directory, .gguf file, Megatron checkpoint or hub id (default: the "
                             f"bundled SmolLM2-135M-Instruct at {bundled_model_path()})")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help=f"a .gguf file, a Hugging Face directory or hub id, or a preset "
                             f"(default: the bundled SmolLM2-135M-Instruct at {bundled_model_path()})")
    parser.add_argument("--dtype", "--infer_dtype", dest="dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (float32 on CPU, bf16 on GPU; with auto a GGUF's "
                             "Q4_0/Q4_1/Q8_0 weights and a `danlu quantize` checkpoint stay quantized and are "
                             "computed on directly, unless --adapter is given; a float dtype dequantizes them)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--hub", default=None, choices=["huggingface", "modelscope"],
                        help="where hub ids are downloaded from (default: $DANLU_HUB or huggingface)")
    parser.add_argument("--adapter", "--adapter_name_or_path", dest="adapter", default=None,
                        help="a LoRA adapter directory (PEFT format) used unmerged; comma-separated for several")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The optional first positional of chat, api, webui and generate: a LLaMA-Factory inference YAML."""
    keys = ", ".join(OPTIONS)
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG.yaml",
                        help=f"LLaMA-Factory's inference YAML (as for `llamafactory-cli chat|api|webchat`): {keys}, "
                             f"infer_backend, trust_remote_code, finetuning_type, enable_thinking, ...; "
                             f"the flags given override it")


def add_template_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", default=None,
                        help=f"chat template: {' | '.join(TEMPLATES)} (default: the model's own)")


def add_sampling_options(parser: argparse.ArgumentParser, defaults: GenerationConfig) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="0 disables")
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    add_template_option(parser)
    parser.add_argument("--system", "--default_system", dest="system", default=None, help="system prompt")


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="decode with a static-shape step compiled by torch.compile (faster per token, most of "
                             "all on quantized weights; the first answer of each batch size and cache size waits for "
                             "the compilation, ~30 s on a CPU)")


def decoding_of(args) -> str:
    return "compiled" if args.compile else "dynamic"


def sampling_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop))


def load_from_args(args, show_progress: bool = True):
    from danlu.checkpoints.load import default_device, load_pretrained, parse_dtype

    adapter = getattr(args, "adapter", None)
    dtype = args.dtype
    if adapter and dtype == "auto":
        # An adapter was trained on the float weights: with one, "auto" is the device's float dtype (a GGUF is
        # dequantized), so the answers are the merged model's; without, a GGUF's weights stay quantized.
        dtype = parse_dtype("auto", args.device or default_device())
    lm = load_pretrained(args.model, dtype=dtype, device=args.device, hub=args.hub, show_progress=show_progress)
    if adapter:
        from danlu.tuning.lora import load_adapter, merge_lora

        adapters = [a.strip() for a in args.adapter.split(",") if a.strip()]
        for i, adapter in enumerate(adapters):
            if i:  # earlier adapters are folded in so the next one wraps plain linears
                merge_lora(lm.model)
            load_adapter(lm.model, adapter)
    return lm


# ---------------------------------------------------------------- LLaMA-Factory's keys
# `danlu export FILE.yaml` and `danlu chat|api|webui|generate FILE.yaml` read LLaMA-Factory's files with its key
# names and meanings (src/llamafactory/hparams/*_args.py). A key danlu cannot honour is either `ignored` (it
# changes nothing here; setting it says so once) or `refused` (it would change the result: setting it fails).


def check_adapter_method(adapter: Optional[str], finetuning_type: str) -> None:
    if adapter and finetuning_type != "lora":
        raise ArgumentError(f"finetuning_type {finetuning_type!r} with adapter_name_or_path: adapters are only "
                            f"valid for finetuning_type lora (as in LLaMA-Factory)")


def describe_keys(cls) -> list[str]:
    """One help line per key of a keys dataclass, saying which are ignored or refused and why."""
    lines = []
    for f in dataclasses.fields(cls):
        note = (f"; ignored: {f.metadata['ignored']}" if "ignored" in f.metadata else
                f"; any other value is refused: {f.metadata['refused']}" if "refused" in f.metadata else "")
        lines.append(f"  --{f.name} (default: {f.default}{note})")
    return lines


def parse_keys(argv: list[str], cls):
    """`parse_arguments`, its errors naming the config file they come from."""
    try:
        return parse_arguments(argv, cls)
    except ArgumentError as e:
        path = argv[0] if argv and not argv[0].startswith("--") else None
        if path is None or str(e).startswith(path):
            raise
        where = path if len(argv) == 1 else f"{path} (or the flags after it)"
        raise ArgumentError(f"{where}: {e}") from None


FINETUNING_TYPES = ("lora", "oft", "freeze", "full")
DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class ModelKeys:
    """LLaMA-Factory's model keys, common to its export and inference files."""
    model_name_or_path: Optional[str] = None  # None: the bundled SmolLM2-135M-Instruct
    adapter_name_or_path: Optional[str] = None  # comma-separated for several
    template: Optional[str] = None
    finetuning_type: str = "lora"  # without an adapter the model is used as it is, whatever the method
    infer_dtype: str = "auto"
    trust_remote_code: bool = ignored(False, "danlu runs no code from model repositories; it reads the "
                                             "architectures it supports with its own code")

    def __post_init__(self) -> None:
        check_choice("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        check_choice("infer_dtype", self.infer_dtype, DTYPES)
        check_adapter_method(self.adapter_name_or_path, self.finetuning_type)
        if self.template is not None:
            try:
                get_template(self.template)
            except ValueError as e:
                raise ArgumentError(f"template: {e}") from None
        check_refused(self)


VLLM_ONLY = "it configures the vLLM engine (infer_backend: vllm); danlu serves with its own engine"
SGLANG_ONLY = "it configures the SGLang engine (infer_backend: sglang); danlu serves with its own engine"


@dataclass
class InferenceArguments(ModelKeys):
    """LLaMA-Factory's inference file (examples/inference/*.yaml) as chat, api, webui and generate read it.

    A generating key left out keeps the command's own default, not LLaMA-Factory's (do_sample true,
    temperature 0.95, top_p 0.7, top_k 50, max_new_tokens 1024).
    """
    infer_backend: str = ignored("huggingface", "danlu's own engine serves instead")
    default_system: Optional[str] = None
    enable_thinking: Optional[bool] = True
    quantization_bit: Optional[int] = refused(None, "danlu loads the weights unquantized; quantizing them on the "
                                                    "fly (bitsandbytes) would change the answers")
    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_new_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    num_beams: int = refused(1, "danlu decodes greedily or by sampling, never by beam search")
    max_length: int = ignored(1024, "LLaMA-Factory reads it only when max_new_tokens is not positive; "
                                    "set max_new_tokens")
    length_penalty: float = ignored(1.0, "it only shapes beam search (num_beams > 1), which danlu does not do")
    skip_special_tokens: bool = refused(True, "danlu always leaves special tokens out of the text it returns")
    vllm_maxlen: int = ignored(4096, VLLM_ONLY)
    vllm_gpu_util: float = ignored(0.7, VLLM_ONLY)
    vllm_enforce_eager: bool = ignored(False, VLLM_ONLY)
    vllm_max_lora_rank: int = ignored(32, VLLM_ONLY)
    vllm_config: Optional[str] = ignored(None, VLLM_ONLY)
    sglang_maxlen: int = ignored(4096, SGLANG_ONLY)
    sglang_mem_fraction: float = ignored(0.7, SGLANG_ONLY)
    sglang_tp_size: int = ignored(-1, SGLANG_ONLY)
    sglang_config: Optional[str] = ignored(None, SGLANG_ONLY)
    sglang_lora_backend: str = ignored("triton", SGLANG_ONLY)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("infer_backend", self.infer_backend, ("huggingface", "vllm", "sglang", "ktransformers"))


# Each inference key that a command option means, -> that option's dest (the first one the command has).
# do_sample comes after temperature: `do_sample: false` is greedy whatever the temperature, as in LLaMA-Factory.
OPTIONS = {"model_name_or_path": ("model",), "adapter_name_or_path": ("adapter",), "template": ("template",),
           "default_system": ("system",), "infer_dtype": ("dtype",), "temperature": ("temperature",),
           "do_sample": ("temperature",), "top_p": ("top_p",), "top_k": ("top_k",),
           "repetition_penalty": ("repetition_penalty",), "max_new_tokens": ("max_new_tokens", "max_tokens")}
SAMPLING_TEMPERATURE = 0.95  # LLaMA-Factory's default, for `do_sample: true` where the command defaults to greedy


def option_defaults(keys: InferenceArguments, args: argparse.Namespace) -> dict[str, Any]:
    """The command's option values that the file's keys stand for (`args`: the command line without it)."""
    sample = None
    if keys.do_sample is False:
        sample = 0.0
    elif keys.do_sample and keys.temperature is None and getattr(args, "temperature", 1.0) == 0:
        sample = SAMPLING_TEMPERATURE
    values = {}
    for key, dests in OPTIONS.items():
        value = sample if key == "do_sample" else getattr(keys, key)
        if value is None:
            continue
        dest = next((d for d in dests if hasattr(args, d)), None)
        if dest is None:
            raise ArgumentError(f"{key}: danlu {args.command} has no server-wide setting for it; clients send "
                                f"it with each request")
        values[dest] = value
    if keys.enable_thinking is False:
        values["enable_thinking"] = False
    return values


def apply_config(args: argparse.Namespace, reparse) -> argparse.Namespace:
    """chat/api/webui/generate's arguments with the options their CONFIG.yaml sets; the flags given still win.

    `reparse(defaults)` parses the same command line again with `defaults` as the options' defaults.
    """
    path = args.config
    keys = parse_keys([path], InferenceArguments)
    try:
        args = reparse(option_defaults(keys, args))
        check_adapter_method(args.adapter, keys.finetuning_type)
        if getattr(args, "enable_thinking", True) is False:
            if not args.template:
                raise ArgumentError("enable_thinking: false needs a named template (for instance template: qwen3): "
                                    "danlu turns thinking off through its own templates")
            args.template = get_template(args.template, enable_thinking=False)
    except ArgumentError as e:
        raise ArgumentError(f"{path}: {e}") from None
    return args
