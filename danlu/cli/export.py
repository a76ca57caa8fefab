"""`danlu export [MERGE.yaml] [--key value ...]`: LLaMA-Factory's `llamafactory-cli export`, same keys.

Merges LoRA adapters into the base model (or, without adapters, writes the model again) as a Hugging Face
directory of safetensors shards. Differences from LLaMA-Factory: the merge runs on the CPU in float32 whatever
export_device says; `infer_dtype: auto` keeps the base checkpoint's dtype (LLaMA-Factory turns a float32 base
into bfloat16 or float16 on a machine with a GPU); no Ollama Modelfile is written. Keys that would change the
written model in a way danlu cannot (.bin files, GPTQ quantization, uploading) are refused.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from danlu.cli.common import ModelKeys, describe_keys, parse_keys
from danlu.training.arguments import ArgumentError, check_choice, ignored, refused
from danlu.utils.atomic import check_output_directory
from danlu.utils.progress import logger

QUANTIZATION_ONLY = "it is read only with export_quantization_bit, which danlu does not support"
# LLaMA-Factory's templates with replace_jinja_template: their text replaces the tokenizer's own chat template.
REPLACES_CHAT_TEMPLATE = ("alpaca", "chatml", "default")


@dataclass
class ExportArguments(ModelKeys):
    adapter_scales: Optional[str] = None  # danlu's: comma-separated, one per adapter (default 1.0 each)
    export_dir: Optional[str] = None
    export_size: int = 5  # largest shard, in GB
    export_dtype: str = "auto"  # danlu's name for infer_dtype here; auto = the base checkpoint's dtype
    export_device: str = ignored("cpu", "danlu merges on the CPU in float32, then casts to the export dtype")
    export_legacy_format: bool = refused(False, "danlu writes safetensors only, never pickled .bin files (which can "
                                                "run code when loaded); transformers, vLLM and llama.cpp read "
                                                "safetensors, and LLaMA-Factory on transformers 5 writes them too")
    export_quantization_bit: Optional[int] = refused(None, "danlu does not quantize on export (GPTQ); export "
                                                           "unquantized and quantize the result with a GPTQ tool")
    export_quantization_dataset: Optional[str] = ignored(None, QUANTIZATION_ONLY)
    export_quantization_nsamples: int = ignored(128, QUANTIZATION_ONLY)
    export_quantization_maxlen: int = ignored(1024, QUANTIZATION_ONLY)
    # danlu's: a DynaBERT-trained model (`--kd_method dynabert`) written at one of its sizes, as a smaller model
    dynabert_width: float = 1.0
    dynabert_depth: float = 1.0
    export_hub_model_id: Optional[str] = refused(None, "danlu does not upload; upload export_dir afterwards, e.g. "
                                                       "`hf upload ID EXPORT_DIR`")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.export_dir:
            raise ArgumentError("export_dir is required: the directory the model is written to")
        check_choice("export_device", self.export_device, ("cpu", "auto"))
        if self.export_size <= 0:
            raise ArgumentError(f"export_size must be a positive number of GB, got {self.export_size}")
        self.output_dtype()  # an unknown or conflicting dtype fails before anything is loaded

    @property
    def adapters(self) -> list[str]:
        return [a.strip() for a in (self.adapter_name_or_path or "").split(",") if a.strip()]

    @property
    def scales(self) -> list[float]:
        if not self.adapter_scales:
            return [1.0] * len(self.adapters)
        try:
            scales = [float(s) for s in self.adapter_scales.split(",")]
        except ValueError:
            raise ArgumentError(f"adapter_scales: expected numbers, got {self.adapter_scales!r}") from None
        if len(scales) != len(self.adapters):
            raise ArgumentError(f"adapter_scales has {len(scales)} value(s) for {len(self.adapters)} adapter(s)")
        return scales

    def output_dtype(self):
        """The torch dtype asked for by export_dtype or infer_dtype, or None for the base checkpoint's."""
        from danlu.checkpoints.load import DTYPES

        chosen = {}
        for key in ("export_dtype", "infer_dtype"):
            name = getattr(self, key)
            if name != "auto" and name not in DTYPES:
                raise ArgumentError(f"{key} must be auto or one of {', '.join(DTYPES)}, got {name!r}")
            if name != "auto":
                chosen[key] = DTYPES[name]
        if len(set(chosen.values())) > 1:
            raise ArgumentError(f"export_dtype {self.export_dtype!r} and infer_dtype {self.infer_dtype!r} disagree; "
                                f"set one of them")
        return next(iter(chosen.values()), None)


def add_parser(sub, name):
    parser = sub.add_parser(name, help="merge LoRA adapters into a full Hugging Face checkpoint (LLaMA-Factory's "
                                       "export keys)", add_help=False)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="[CONFIG.yaml] --key value ...")
    parser.set_defaults(run=run)
    return parser


def prepare_tokenizer(tokenizer, template_name: Optional[str], causal: bool = True) -> None:
    """Leave the tokenizer as LLaMA-Factory's export does (its get_template_and_fix_tokenizer, padding left for
    a decoder; an encoder's learned positions count from the first token, so it keeps padding right)."""
    if template_name is not None:
        from danlu.tokenization.templates import get_template

        template = get_template(template_name)
        stop = template.stop_words[0] if template.replace_eos else None
        if stop is not None and tokenizer.eos_token != stop:
            if stop not in tokenizer.get_vocab():
                raise ArgumentError(f"template {template_name!r} makes {stop!r} the eos token, but this tokenizer "
                                    f"has no such token (LLaMA-Factory would add one and resize the embeddings)")
            tokenizer.add_special_tokens({"eos_token": stop})
        if not isinstance(tokenizer.chat_template, str) or template_name in REPLACES_CHAT_TEMPLATE:
            if template.default_system:
                raise ArgumentError(f"template {template_name!r}: LLaMA-Factory writes it, with its default system "
                                    f"prompt, into the exported tokenizer, and danlu's text of it has no default "
                                    f"system prompt. Leave template out and name it when you chat")
            tokenizer.chat_template = template.jinja
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if causal:
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # saved from init_kwargs


def export_merged(args: ExportArguments):
    from pathlib import Path

    from danlu.checkpoints.hf import save_hf_checkpoint
    from danlu.checkpoints.load import load_pretrained
    from danlu.cli.convert import source_dtype
    from danlu.low_rank.checkpoint import refuse_factorized
    from danlu.tuning.lora import load_adapter, merge_lora

    lm = load_pretrained(args.model_name_or_path, dtype="float32", device="cpu", show_progress=True)
    refuse_factorized(lm.model, "danlu export")
    if lm.tokenizer is not None:
        prepare_tokenizer(lm.tokenizer, args.template, lm.config.causal)
    for adapter, scale in zip(args.adapters, args.scales):
        load_adapter(lm.model, adapter, scale)
        merge_lora(lm.model)
    if (args.dynabert_width, args.dynabert_depth) != (1.0, 1.0):
        from danlu.distillation.dynabert import extract

        try:
            lm.model = extract(lm.model, args.dynabert_width, args.dynabert_depth)
        except ValueError as e:
            raise ArgumentError(f"dynabert_width / dynabert_depth: {e}") from e
        lm.config = lm.model.config
    dtype = args.output_dtype() or source_dtype(Path(lm.source))
    return save_hf_checkpoint(lm.model.state_dict(), lm.config, Path(args.export_dir), dtype,
                              args.export_size * 1000**3, lm.tokenizer, lm.generation_defaults, show_progress=True)


def run(args) -> int:
    if not args.argv or args.argv[0] in ("-h", "--help"):
        print("usage: danlu export [CONFIG.yaml] [--key value ...]\n"
              "keys (LLaMA-Factory's names and meanings; flags override the file):")
        print("\n".join(describe_keys(ExportArguments)))
        return 0
    export_args = parse_keys(args.argv, ExportArguments)
    check_output_directory(export_args.export_dir, "export_dir")  # before the model loads
    out = export_merged(export_args)
    logger.info("no Ollama Modelfile is written (LLaMA-Factory's export writes one beside the weights)")
    print(f"wrote {out}")
    return 0
