"""`danlu convert SRC OUT_DIR [--dtype ...]`: GGUF or Hugging Face in, Hugging Face directory out."""
from __future__ import annotations

from pathlib import Path

import torch

from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import DTYPES, load_pretrained
from danlu.utils.jsonfile import read_json


def add_parser(sub, name):
    parser = sub.add_parser(name, help="convert a GGUF file or Hugging Face directory to a Hugging Face directory")
    parser.add_argument("src", help=".gguf file, Hugging Face directory or hub id")
    parser.add_argument("out_dir")
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


def convert(src, out_dir, dtype: str = "auto", shard_bytes: int = 2 * 1000**3, force: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not force:
        raise ValueError(f"{out}: already exists; pass --force to replace it")
    target = source_dtype(Path(src)) if dtype == "auto" else DTYPES.get(dtype)
    if target is None:
        raise ValueError(f"--dtype: unknown {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    lm = load_pretrained(src, dtype=target, device="cpu", show_progress=True)
    generation = dict(lm.generation_defaults)
    return save_hf_checkpoint(lm.model.state_dict(), lm.config, out, target, shard_bytes, lm.tokenizer,
                              generation, show_progress=True)


def run(args) -> int:
    out = convert(args.src, args.out_dir, args.dtype, parse_size(args.shard_size), args.force)
    print(f"wrote {out}")
    return 0
