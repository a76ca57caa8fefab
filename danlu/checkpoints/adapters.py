"""PEFT's LoRA adapter format: adapter_config.json + adapter_model.safetensors, written and read only here.

An adapter is a `PeftAdapter`: the `LoRAConfig` it was trained with, the LoRA weights
(`<module>.lora_A.weight`, `<module>.lora_B.weight` under our module names) and the weights of the
modules_to_save (LLaMA-Factory's additional_target: whole modules that trained, under their plain names).
`write_adapter` and `read_adapter` turn one into the files and back. Keys on disk are our names under PEFT's
prefix `base_model.model.`, so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads what danlu
trains, and back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import read_json

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORA_PARTS = ("lora_A", "lora_B")
# PEFT options whose non-default value changes what the weights mean; danlu would compute something else.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "rank_pattern": {},
               "alpha_pattern": {}, "bias": "none"}


def _names(value, field_name: str) -> Optional[list[str]]:
    """A list of names from a list or a comma-separated string (None stays None)."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"lora {field_name} must be non-empty module names, got {value!r}")
    return names


@dataclass
class LoRAConfig:
    """How LoRA adapts a model: W x + (alpha / rank) * B A x on the `targets` linears.

    targets: module names, each a layer's own name (`q_proj`) or its full name; `all` means every linear whose
    role (danlu.models.roles) is column or row, so neither the embedding nor the output head.
    modules_to_save: whole modules that train beside the adapters and are saved with them (PEFT's
    modules_to_save, LLaMA-Factory's additional_target); a module is chosen when its name ends with an entry.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all"])
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        self.targets = _names(self.targets, "targets")
        if not self.targets:
            raise ValueError("lora targets must name at least one module (or 'all')")
        self.modules_to_save = _names(self.modules_to_save, "modules_to_save") or None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PeftAdapter:
    """A LoRA adapter as PEFT stores it, under our module names."""

    config: LoRAConfig
    lora_state: dict[str, torch.Tensor]  # <module>.lora_A.weight [rank, in], <module>.lora_B.weight [out, rank]
    saved_state: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save weights, plain names
    base_model: Optional[str] = None

    def modules(self) -> list[str]:
        """The names of the adapted modules, sorted."""
        return sorted({key.rsplit(".", 2)[0] for key in self.lora_state})


def is_lora_key(name: str) -> bool:
    return any(f".{part}." in name for part in LORA_PARTS)


def is_module_to_save(module_name: str, modules_to_save: Optional[list[str]]) -> bool:
    """PEFT's rule: a module is saved whole when its dotted name ends with an entry of modules_to_save."""
    return any(module_name.endswith(entry) for entry in modules_to_save or [])


def _check_lora_state(adapter: PeftAdapter, where: str) -> None:
    """Every adapted module has lora_A [rank, in] and lora_B [out, rank] with the config's rank."""
    if not adapter.lora_state:
        raise CheckpointError(f"{where}: the adapter has no LoRA weights")
    rank = adapter.config.rank
    for module in adapter.modules():
        a, b = (adapter.lora_state.get(f"{module}.{part}.weight") for part in LORA_PARTS)
        if a is None or b is None:
            raise CheckpointError(f"{where}: {module} needs both lora_A.weight and lora_B.weight")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                  f"which do not fit rank r={rank}")
    unexpected = sorted(set(adapter.lora_state) - {f"{m}.{p}.weight" for m in adapter.modules() for p in LORA_PARTS})
    if unexpected:
        raise CheckpointError(f"{where}: unexpected LoRA weight(s) {unexpected[:3]} (danlu reads lora_A and lora_B "
                              f"of linear layers)")


def peft_config(adapter: PeftAdapter) -> dict:
    """The adapter_config.json of an adapter."""
    config = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(set(config.targets)),
        "init_lora_weights": True,
        "inference_mode": True,
        **UNSUPPORTED,
        "modules_to_save": config.modules_to_save,
        "base_model_name_or_path": adapter.base_model,
        "revision": None,
    }


def write_adapter(directory: Path, adapter: PeftAdapter) -> Path:
    """Write an adapter in PEFT's format (replacing the directory once the new one is complete)."""
    from safetensors.torch import save_file

    where = f"cannot write the adapter {directory}"
    _check_lora_state(adapter, where)
    config = adapter.config
    uncovered = [m for m in adapter.modules() if m not in config.targets and m.rsplit(".", 1)[-1] not in config.targets]
    if uncovered:
        raise CheckpointError(f"{where}: target_modules {config.targets} do not name the adapted {uncovered[:3]} "
                              f"(write the resolved names, not 'all')")
    lora_keys = [k for k in adapter.saved_state if is_lora_key(k)]
    if lora_keys:
        raise CheckpointError(f"{where}: modules_to_save weights hold LoRA weights {lora_keys[:3]}")
    outside = [k for k in adapter.saved_state if not any(
        is_module_to_save(".".join(k.split(".")[:i]), config.modules_to_save) for i in range(1, k.count(".") + 1))]
    if outside:
        raise CheckpointError(f"{where}: {outside[:3]} belong to no module of modules_to_save "
                              f"{config.modules_to_save}")
    state = {**adapter.lora_state, **adapter.saved_state}
    tensors = {PREFIX + name: t.detach().contiguous().cpu() for name, t in state.items()}
    with atomic_directory(Path(directory)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2), encoding="utf-8")
    return Path(directory)


def _lora_config(raw: dict, where: Path) -> LoRAConfig:
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {raw.get('peft_type')!r} is not supported (LORA is)")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            raise CheckpointError(f"{where}: missing {key!r}")
    unsupported = {k: raw[k] for k, default in UNSUPPORTED.items() if raw.get(k) not in (None, default)}
    if unsupported:
        raise CheckpointError(f"{where}: {unsupported} is not supported (danlu reads plain LoRA: "
                              f"{UNSUPPORTED})")
    try:
        return LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout") or 0.0), targets=raw["target_modules"],
                          modules_to_save=raw.get("modules_to_save"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def read_adapter(directory: Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory (target_modules may be a list or a single name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    raw = read_json(config_path, CheckpointError, f"an adapter directory needs {CONFIG_NAME}")
    config = _lora_config(raw, config_path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read (truncated or corrupt?): {e}") from e
    lora_state, saved_state = {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{weights}: unexpected key {key!r} (expected the prefix {PREFIX!r})")
        name = key[len(PREFIX):].replace(".default.", ".")
        (lora_state if ".lora_" in name else saved_state)[name] = tensor
    adapter = PeftAdapter(config, lora_state, saved_state, raw.get("base_model_name_or_path"))
    _check_lora_state(adapter, str(weights))
    return adapter

