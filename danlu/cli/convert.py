"""`danlu convert SRC OUT_DIR [--to hf|megatron] [--dtype ...]`: a GGUF file, Hugging Face directory or Megatron
checkpoint in; a Hugging Face directory or a Megatron checkpoint (any tensor/pipeline split, mcore or legacy
names) out."""
from __future__ import annotations

from pathlib import Path

import torch

from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import DTYPES, load_pretrained
from danlu.checkpoints.megatron import LAYOUTS, MegatronSplit, save_megatron
from danlu.utils.atomic import check_output_directory
from danlu.utils.jsonfile import read_json


def add_parser(sub, name):
    parser = sub.add_parser(name, help="convert a GGUF file, Hugging Face directory or Megatron checkpoint to a "
                                       "Hugging Face directory or a Megatron checkpoint")
    parser.add_argument("src", help=".gguf file, Hugging Face directory, Megatron checkpoint directory or hub id")
    parser.add_argument("out_dir")
    parser.add_argument("--to", choices=("hf", "megatron"), default="hf", help="the output's format")
    megatron = parser.add_argument_group("Megatron output (--to megatron)")
    megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: one file per rank")
    megatron.add_argument("--pp", type=int, default=1, help="pipeline stages: one file per stage and tp rank")
    megatron.add_argument("--layout", choices=LAYOUTS, default="mcore",
                          help="mcore: megatron.core's GPTModel names; legacy: Megatron-LM's language_model")
    megatron.add_argument("--te", action="store_true",
                          help="Transformer Engine's names for the norms (linear_qkv.layer_norm_weight, ...)")
    megatron.add_argument("--pipeline_first_stage_layers", type=int, default=None,
                          help="layers on the first stage (Megatron's decoder_first_pipeline_num_layers)")
    megatron.add_argument("--pipeline_last_stage_layers", type=int, default=None,
                          help="layers on the last stage (decoder_last_pipeline_num_layers)")
    megatron.add_argument("--make_vocab_size_divisible_by", type=int, default=128,
                          help="the vocabulary is padded to a multiple of this times --tp")
    megatron.add_argument("--iteration", type=int, default=None,
                          help="write iter_NNNNNNN/ for this iteration instead of release/")
    parser.add_argument("--dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (the source's dtype; float32 for GGUF)")
    parser.add_argument("--shard_size", default="2GB", help="largest safetensors shard, e.g. 500MB, 2GB")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.set_defaults(run=run)


def parse_size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        unit, number = "B", upper
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"--shard_size: cannot read {text!r}; write e.g. 500MB or 2GB") from None


def source_dtype(src: Path) -> torch.dtype:
    config = src / "config.json"
    if src.is_dir() and config.is_file():
        hf = read_json(config, CheckpointError)
        return DTYPES.get(hf.get("torch_dtype") or hf.get("dtype") or "float32", torch.float32)
    return torch.float32


def convert(src, out_dir, dtype: str = "auto", shard_bytes: int = 2 * 1000**3, force: bool = False,
            megatron: MegatronSplit | None = None, iteration: int | None = None) -> Path:
    """Write the model at `src` as a Hugging Face directory, or as a Megatron checkpoint split as `megatron`."""
    out = check_output_directory(out_dir, "OUT_DIR")
    if out.exists() and not force:
        raise ValueError(f"{out}: already exists; pass --force to replace it")
    target = source_dtype(Path(src)) if dtype == "auto" else DTYPES.get(dtype)
    if target is None:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    if megatron is not None:
        from danlu.checkpoints.load import load_config

        megatron.check(load_config(src))  # a split that does not fit is refused before the weights load
    lm = load_pretrained(src, dtype=target, device="cpu", show_progress=True)
    generation = dict(lm.generation_defaults)
    state = lm.model.state_dict()
    if megatron is not None:
        return save_megatron(state, lm.config, out, megatron, target, lm.tokenizer, generation, iteration,
                             show_progress=True)
    return save_hf_checkpoint(state, lm.config, out, target, shard_bytes, lm.tokenizer, generation,
                              show_progress=True)


def megatron_split(args) -> MegatronSplit | None:
    if args.to != "megatron":
        given = [f"--{name}" for name in ("tp", "pp", "pipeline_first_stage_layers", "pipeline_last_stage_layers",
                                          "iteration") if getattr(args, name) not in (None, 1)]
        given += ["--te"] * args.te + ["--layout"] * (args.layout != "mcore")
        if given:
            raise ValueError(f"{', '.join(given)}: Megatron options, but the output is --to {args.to}; "
                             f"add --to megatron")
        return None
    return MegatronSplit(tp=args.tp, pp=args.pp, layout=args.layout, te=args.te,
                         first_stage_layers=args.pipeline_first_stage_layers,
                         last_stage_layers=args.pipeline_last_stage_layers,
                         vocab_divisible_by=args.make_vocab_size_divisible_by)


def run(args) -> int:
    out = convert(args.src, args.out_dir, args.dtype, parse_size(args.shard_size), args.force,
                  megatron_split(args), args.iteration)
    print(f"wrote {out}")
    return 0
