"""`danlu export`: merge LoRA adapters into the base model (LLaMA-Factory's export keys)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from danlu.training.arguments import ArgumentError


@dataclass
class ExportArguments:
    model_name_or_path: Optional[str] = None
    adapter_name_or_path: Optional[str] = None  # comma-separated for several
    adapter_scales: Optional[str] = None  # comma-separated, one per adapter (default 1.0 each)
    export_dir: Optional[str] = None
    export_size: int = 5  # largest shard, in GB
    export_dtype: str = "auto"  # auto = the base checkpoint's dtype
    template: Optional[str] = None
    finetuning_type: str = "lora"

    def __post_init__(self) -> None:
        if not self.export_dir:
            raise ArgumentError("export_dir is required")
        if not self.adapter_name_or_path:
            raise ArgumentError("adapter_name_or_path is required (comma-separated for several)")
        if self.finetuning_type != "lora":
            raise ArgumentError(f"finetuning_type must be lora for export, got {self.finetuning_type!r}")

    @property
    def adapters(self) -> list[str]:
        return [a.strip() for a in self.adapter_name_or_path.split(",") if a.strip()]

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


def add_parser(sub, name):
    parser = sub.add_parser(name, help="merge LoRA adapters into a full Hugging Face checkpoint", add_help=False)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="[CONFIG.yaml] --key value ...")
    parser.set_defaults(run=run)


def export_merged(args: ExportArguments):
    from danlu.checkpoints.hf import save_hf_checkpoint
    from danlu.checkpoints.load import DTYPES, load_pretrained
    from danlu.cli.convert import source_dtype
    from danlu.tuning.lora import load_adapter, merge_lora
    from pathlib import Path

    lm = load_pretrained(args.model_name_or_path, dtype="float32", device="cpu", show_progress=True)
    for adapter, scale in zip(args.adapters, args.scales):
        load_adapter(lm.model, adapter, scale)
        merge_lora(lm.model)
    if args.export_dtype == "auto":
        dtype = source_dtype(Path(lm.source))
    elif args.export_dtype in DTYPES:
        dtype = DTYPES[args.export_dtype]
    else:
        raise ArgumentError(f"export_dtype must be auto or one of {sorted(DTYPES)}, got {args.export_dtype!r}")
    return save_hf_checkpoint(lm.model.state_dict(), lm.config, Path(args.export_dir), dtype,
                              args.export_size * 1000**3, lm.tokenizer, lm.generation_defaults, show_progress=True)


def run(args) -> int:
    from danlu.training.arguments import parse_arguments

    out = export_merged(parse_arguments(args.argv, ExportArguments))
    print(f"wrote {out}")
    return 0
