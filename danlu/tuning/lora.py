"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x, with B = 0 at the start so the model is unchanged.

Adapters are injected into the one model in place (`apply_lora`); the model file never learns of them.
Module names follow PEFT (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`), so an adapter's keys are
our parameter names with PEFT's prefix.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all"])  # module names, "all" = every linear but lm_head

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the LoRA paper's code
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        lora_input = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(lora_input)) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
            and not name.endswith(("lora_A", "lora_B"))]


def resolve_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full module names to adapt: 'all' means every linear layer but the output head."""
    targets = list(targets)
    linears = linear_module_names(model)
    chosen = set()
    for target in targets:
        if target == "all":
            chosen.update(n for n in linears if not n.endswith("lm_head"))
            continue
        matches = [n for n in linears if n == target or n.split(".")[-1] == target]
        if not matches:
            kinds = sorted({n.split(".")[-1] for n in linears})
            raise ValueError(f"lora_target {target!r} matches no linear layer; choose from {kinds} or 'all'")
        chosen.update(matches)
    return [n for n in linears if n in chosen]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the target linears in LoRALinear, freeze everything else; returns the adapted module names."""
    names = resolve_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, config.rank, config.alpha, config.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, under our names (e.g. model.layers.0.self_attn.q_proj.lora_A.weight)."""
    return {f"{name}.{part}.weight": getattr(m, part).weight.detach()
            for name, m in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear back."""
    for name, module in lora_modules(model).items():
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base_layer)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the plain names, with adapters (merged or not) left out."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def count_trainable(model: nn.Module) -> tuple[int, int]:
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def load_adapter(model: nn.Module, directory, scale: float = 1.0) -> list[str]:
    """Inject a PEFT LoRA adapter from disk (its weights scaled by `scale`); returns the adapted modules."""
    from danlu.checkpoints.adapters import read_peft_adapter
    from danlu.checkpoints.errors import CheckpointError

    config, state = read_peft_adapter(directory)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    lora_config = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]) * scale,
                             dropout=float(config.get("lora_dropout") or 0.0), targets=targets)
    names = apply_lora(model, lora_config)
    # PEFT's modules_to_save (LLaMA-Factory's additional_target) are whole weights under plain names.
    full = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    state = {k: v for k, v in state.items() if k not in full}
    expected = lora_state_dict(model)
    params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected)) + sorted(set(full) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: adapter does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, tensor in full.items():
            if tensor.shape != params[key].shape:
                raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(params[key].shape)}")
            params[key].copy_(tensor)
        for key, tensor in state.items():
            module_name, part, _ = key.rsplit(".", 2)
            target = getattr(modules[module_name], part).weight
            if tensor.shape != target.shape:
                raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(target.shape)}")
            target.copy_(tensor)
    return names
