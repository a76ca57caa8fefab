"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x, with B = 0 at the start so the model is unchanged.

Adapters are injected into the one model in place (`apply_lora`); the model file never learns of them.
Module names follow PEFT (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`), so an adapter's keys are
our parameter names with PEFT's prefix. The adapter files are written and read by danlu.checkpoints.adapters
(`save_adapter` and `load_adapter` here go through it); `LoRAConfig` lives there too and is re-exported here.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from danlu.checkpoints.adapters import (LoRAConfig, PeftAdapter, is_lora_key, is_module_to_save, read_adapter,
                                        write_adapter)
from danlu.checkpoints.errors import CheckpointError
from danlu.models.roles import COLUMN, ROW, role_of
from danlu.tuning.surgery import LinearWrapper, base_linears, plain_name, replace_module

__all__ = ["LoRAConfig", "LoRALinear", "adapters_disabled", "apply_lora", "base_state_dict", "check_adapter_fits",
           "count_trainable", "linear_module_names", "load_adapter", "lora_modules", "lora_state_dict",
           "merge_lora", "modules_to_save_state", "resolve_modules_to_save", "resolve_targets", "save_adapter"]


class LoRALinear(LinearWrapper):
    """A linear layer (or another wrapper) plus a low-rank update. `disabled` switches the update off (the
    output is the base layer's alone, merged or not) without touching any weight."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the LoRA paper's code
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled != self.merged:  # enabled and folded in, or disabled and apart: the base is the answer
            return out
        lora_input = (x if self.merged else self.lora_dropout(x)).to(self.lora_A.weight.dtype)
        update = (self.lora_B(self.lora_A(lora_input)) * self.scaling).to(out.dtype)
        return out - update if self.merged else out + update  # merged and disabled: take the update back out

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
    """The plain names of the model's linear layers (danlu.tuning.surgery.base_linears)."""
    return [linear.name for linear in base_linears(model)]


def resolve_targets(model: nn.Module, targets: Iterable[str], flag: str = "lora_target") -> list[str]:
    """Plain names of the linears to adapt, in module order. A target is a layer's own name (`q_proj`) or its
    full name; 'all' is every linear whose role (danlu.models.roles) is column or row: not the output head.
    Errors name `flag` (danlu factorize resolves its --targets here too)."""
    linears = linear_module_names(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
    chosen = set()
    for target in targets:
        if target == "all":
            matches = [n for n in linears if role_of(n) in (COLUMN, ROW)]
            if not matches:
                raise ValueError(f"{flag} 'all' matches no linear layer with a column or row role "
                                 f"(danlu.models.roles); name them instead, from {kinds}")
        else:
            matches = [n for n in linears if n == target or n.rsplit(".", 1)[-1] == target]
            if not matches:
                raise ValueError(f"{flag} {target!r} matches no linear layer; choose from {kinds} or 'all'")
        chosen.update(matches)
    return [n for n in linears if n in chosen]


def resolve_modules_to_save(model: nn.Module, modules_to_save: Optional[list[str]]) -> list[str]:
    """Names of the modules that train whole and are saved with the adapter (PEFT's rule: the name ends with
    an entry)."""
    if not modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and is_module_to_save(n, modules_to_save)]
    unmatched = [entry for entry in modules_to_save if not any(n.endswith(entry) for n in names)]
    if unmatched:
        raise ValueError(f"modules_to_save {unmatched} match no module of the model")
    return names


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the target linears in LoRALinear, freeze everything else but the modules_to_save; returns the
    adapted module names."""
    names = resolve_targets(model, config.targets)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    both = [n for n in names if any(n == s or n.startswith(f"{s}.") for s in saved)]
    if both:
        raise ValueError(f"{both[:3]} would be both adapted by LoRA and saved whole (modules_to_save "
                         f"{config.modules_to_save}); leave them out of one of the two")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, under our plain names (e.g. model.layers.0.self_attn.q_proj.lora_A.weight)."""
    state = {}
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            key = f"{plain_name(name)}.{part}.weight"
            if key in state:
                raise ValueError(f"two LoRA adapters are stacked on {plain_name(name)}; merge one first")
            state[key] = getattr(module, part).weight.detach()
    return state


def modules_to_save_state(model: nn.Module, modules_to_save: Optional[list[str]]) -> dict[str, torch.Tensor]:
    """The state of the modules_to_save (adapters left out), under plain names."""
    state = {}
    for name in resolve_modules_to_save(model, modules_to_save):
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
            key = plain_name(f"{name}.{key}")
            if not is_lora_key(key):
                state[key] = tensor.detach()
    return state


def save_adapter(model: nn.Module, directory, config: LoRAConfig, base_model: Optional[str] = None) -> Path:
    """Write the model's adapters in PEFT's format with the config they were made with: its rank, alpha,
    dropout and modules_to_save, and as target_modules the names of the layers actually adapted."""
    lora = lora_state_dict(model)
    if not lora:
        raise ValueError("the model has no LoRA adapter to save; apply_lora first")
    adapted = sorted({key.rsplit(".", 3)[-3] for key in lora})
    used = replace(config, targets=adapted)
    return write_adapter(directory, PeftAdapter(used, lora, modules_to_save_state(model, config.modules_to_save),
                                                base_model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter (disabled or not) into its base weight and put the plain layer back."""
    for name, module in reversed(list(lora_modules(model).items())):  # the innermost of stacked adapters first
        module.merge()
        replace_module(model, name, module.base_layer)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its base (e.g. the reference model of DPO or PPO) without a second copy: every LoRA
    adapter is switched off inside, and each switch is put back as it was on the way out, even on error.
    The modules_to_save train in place and are not switched: their trained weights stay in use."""
    modules = list(lora_modules(model).values())
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, disabled in zip(modules, before):
            m.disabled = disabled


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the plain names, with adapters (merged or not) left out."""
    return {name: tensor.detach() for name, tensor in _base_tensors(model).items()}


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """base_state_dict's tensors themselves (parameters and buffers), to be written in place."""
    return {plain_name(name): t for name, t in model.state_dict(keep_vars=True).items() if not is_lora_key(name)}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def check_adapter_fits(model: nn.Module, adapter: PeftAdapter, where) -> None:
    """Raise CheckpointError unless every adapted module is a linear of the model with matching shapes and
    every modules_to_save weight is a tensor of the model with the same shape."""
    linears = {linear.name: linear.module for linear in base_linears(model)}
    for name in adapter.modules():
        if name not in linears:
            raise CheckpointError(f"{where}: the adapter targets {name!r}, which is not a linear layer of this "
                                  f"model")
        a, b = adapter.lora_state[f"{name}.lora_A.weight"], adapter.lora_state[f"{name}.lora_B.weight"]
        if a.shape[1] != linears[name].in_features or b.shape[0] != linears[name].out_features:
            raise CheckpointError(f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                  f"which do not fit its {linears[name].in_features} -> "
                                  f"{linears[name].out_features} layer")
    tensors = _base_tensors(model)
    for key, tensor in adapter.saved_state.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: {key} (modules_to_save) is not a tensor of this model")
        if tensor.shape != tensors[key].shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(tensors[key].shape)}")


def load_adapter(model: nn.Module, directory, scale: float = 1.0) -> list[str]:
    """Inject a PEFT LoRA adapter from disk (its update scaled by `scale`) and load its modules_to_save;
    returns the adapted modules."""
    adapter = read_adapter(directory)
    check_adapter_fits(model, adapter, directory)
    config = replace(adapter.config, alpha=adapter.config.alpha * scale, targets=adapter.modules())
    try:
        names = apply_lora(model, config)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    tensors = _base_tensors(model)
    with torch.no_grad():
        for key, tensor in adapter.lora_state.items():
            module_name, part, _ = key.rsplit(".", 2)
            getattr(model.get_submodule(module_name), part).weight.copy_(tensor)
        for key, tensor in adapter.saved_state.items():
            tensors[key].copy_(tensor)
    return names
