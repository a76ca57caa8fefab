"""PEFT's LoRA adapter format: adapter_config.json + adapter_model.safetensors.

Keys are our parameter names under PEFT's prefix `base_model.model.`, so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads what danlu trains, and back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import read_json

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_peft_adapter(out_dir: Path, state: dict[str, torch.Tensor], rank: int, alpha: float, dropout: float,
                      target_modules: list[str], base_model: Optional[str] = None,
                      modules_to_save: Optional[list[str]] = None) -> Path:
    from safetensors.torch import save_file

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": base_model,
        "revision": None,
    }
    tensors = {PREFIX + name: t.detach().contiguous().cpu() for name, t in state.items()}
    with atomic_directory(Path(out_dir)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return Path(out_dir)


def read_peft_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, weights under our names) of a PEFT LoRA adapter directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = read_json(config_path, CheckpointError, f"an adapter directory needs {CONFIG_NAME}")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (LORA is)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise CheckpointError(f"{config_path}: missing {key!r}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read (truncated or corrupt?): {e}") from e
    state = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights}: unexpected key {key!r} (expected the prefix {PREFIX!r})")
        name = key[len(PREFIX):].replace(".default.", ".")
        state[name] = tensor
    return config, state
