"""`danlu convert SRC OUT [--to hf|megatron|gguf] [--type ...] [--dtype ...]`: a GGUF file, Hugging Face directory or
Megatron checkpoint in; a Hugging Face directory, a Megatron checkpoint (any tensor/pipeline split, mcore or legacy
names) or a GGUF file for llama.cpp and Ollama (f32, f16, bf16, q8_0, q4_0 or q4_1) out. An OUT ending in .gguf
is a GGUF file; any other OUT is a directory."""
from __future__ import annotations

from pathlib import Path

import torch

from danlu.checkpoints import gguf as gguf_format
from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import DTYPES, load_config, load_pretrained
from danlu.checkpoints.megatron import LAYOUTS, MegatronSplit, save_megatron
from danlu.low_rank.checkpoint import refuse_factorized
from danlu.utils.atomic import check_output_directory, check_output_file
from danlu.utils.jsonfile import read_json

DEFAULT_SHARD_SIZE = "2GB"


def add_parser(sub, name):
    parser = sub.add_parser(name, help="convert a GGUF file, Hugging Face directory or Megatron checkpoint to a "
                                       "Hugging Face directory, a Megatron checkpoint or a GGUF file")
    parser.add_argument("src", help=".gguf file, Hugging Face directory, Megatron checkpoint directory or hub id")
    parser.add_argument("out", metavar="OUT",
                        help="the output: a GGUF file if it ends in .gguf (or with --to gguf), else a directory")
    parser.add_argument("--to", choices=("hf", "megatron", "gguf"), default=None,
                        help="the output's format (default: gguf for an OUT ending in .gguf, else hf)")
    gguf_output = parser.add_argument_group("GGUF output (OUT.gguf or --to gguf)")
    gguf_output.add_argument("--type", default=None, metavar="TYPE",
                             help=f"the GGUF file type: {' | '.join(gguf_format.GGUF_FILE_TYPES)} (default "
                                  f"{gguf_format.DEFAULT_GGUF_FILE_TYPE}, as llama.cpp's convert_hf_to_gguf.py); "
                                  f"vectors stay f32, and with q4_0/q4_1 the token embedding and output matrix "
                                  f"are q8_0")
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
                        help="float32 | bfloat16 | float16 | auto (the source's dtype; float32 for GGUF): the "
                             "weights' type in a directory, the precision they are loaded in for a GGUF file")
    parser.add_argument("--shard_size", default=None,
                        help=f"largest safetensors shard, e.g. 500MB, 2GB (default {DEFAULT_SHARD_SIZE}; "
                             f"directories only)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
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


def is_gguf_name(out) -> bool:
    return Path(out).suffix.lower() == ".gguf"


def convert(src, out, dtype: str = "auto", shard_bytes: int = 2 * 1000**3, force: bool = False,
            megatron: MegatronSplit | None = None, iteration: int | None = None,
            gguf_type: str | None = None) -> Path:
    """Write the model at `src` as a Hugging Face directory, as a Megatron checkpoint split as `megatron`, or as a
    GGUF file of `gguf_type` (one of GGUF_FILE_TYPES; f16 when `out` ends in .gguf and no type is given)."""
    if gguf_type is None and is_gguf_name(out):
        gguf_type = gguf_format.DEFAULT_GGUF_FILE_TYPE
    if gguf_type is not None:
        gguf_format.check_gguf_file_type(gguf_type)
        if megatron is not None:
            raise ValueError(f"{out}: a GGUF file is one file, not a Megatron split; drop the Megatron options")
        out = check_output_file(out, "OUT", force)
    else:
        out = check_output_directory(out, "OUT", force)
    target = source_dtype(Path(src)) if dtype == "auto" else DTYPES.get(dtype)
    if target is None:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    # A model the output cannot hold is refused before the weights load.
    if megatron is not None:
        megatron.check(load_config(src))
    if gguf_type is not None:
        gguf_format.check_gguf_exportable(load_config(src))
    lm = load_pretrained(src, dtype=target, device="cpu", show_progress=True)
    refuse_factorized(lm.model, "danlu convert")
    state = lm.model.state_dict()
    if gguf_type is not None:
        return gguf_format.save_gguf(state, lm.config, out, gguf_type, lm.tokenizer, show_progress=True)
    generation = dict(lm.generation_defaults)
    if megatron is not None:
        return save_megatron(state, lm.config, out, megatron, target, lm.tokenizer, generation, iteration,
                             show_progress=True)
    return save_hf_checkpoint(state, lm.config, out, target, shard_bytes, lm.tokenizer, generation,
                              show_progress=True)


def output_format(args) -> str:
    """hf, megatron or gguf: --to if given, else gguf for an OUT ending in .gguf and hf for any other."""
    if args.to is None:
        return "gguf" if is_gguf_name(args.out) else "hf"
    if args.to != "gguf" and is_gguf_name(args.out):
        raise ValueError(f"--to {args.to}: writes a directory, but OUT {args.out} ends in .gguf; "
                         f"name another OUT or drop --to")
    return args.to


def describe_output(output: str) -> str:
    return "a GGUF file" if output == "gguf" else f"--to {output}"


def megatron_split(args, output: str) -> MegatronSplit | None:
    if output != "megatron":
        given = [f"--{name}" for name in ("tp", "pp", "pipeline_first_stage_layers", "pipeline_last_stage_layers",
                                          "iteration") if getattr(args, name) not in (None, 1)]
        given += ["--te"] * args.te + ["--layout"] * (args.layout != "mcore")
        if given:
            hint = "add --to megatron" if output == "hf" else "a GGUF file is one file, drop them"
            raise ValueError(f"{', '.join(given)}: Megatron options, but the output is {describe_output(output)}; "
                             f"{hint}")
        return None
    return MegatronSplit(tp=args.tp, pp=args.pp, layout=args.layout, te=args.te,
                         first_stage_layers=args.pipeline_first_stage_layers,
                         last_stage_layers=args.pipeline_last_stage_layers,
                         vocab_divisible_by=args.make_vocab_size_divisible_by)


def check_output_options(args, output: str) -> None:
    """Refuse the options of the other formats' outputs, naming them."""
    if output != "gguf" and args.type is not None:
        raise ValueError(f"--type: a GGUF file type, but the output is a directory ({describe_output(output)}); "
                         f"name OUT with .gguf or add --to gguf")
    if output == "gguf" and args.shard_size is not None:
        raise ValueError("--shard_size: a GGUF file is written whole; the option is for directories")


def run(args) -> int:
    output = output_format(args)
    check_output_options(args, output)
    split = megatron_split(args, output)
    gguf_type = (args.type or gguf_format.DEFAULT_GGUF_FILE_TYPE) if output == "gguf" else None
    out = convert(args.src, args.out, args.dtype, parse_size(args.shard_size or DEFAULT_SHARD_SIZE), args.force,
                  split, args.iteration, gguf_type)
    print(f"wrote {out}")
    return 0
