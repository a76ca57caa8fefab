"""Module surgery: replace a submodule by its dotted name, and find the model's own linear layers.

Every transform that swaps modules in place (LoRA, QLoRA's quantization, per-request adapters in serving,
pruning, width slicing) goes through `replace_module`, and finds what to change with `base_linears`.

A *wrapper* (`LinearWrapper`: LoRALinear, serving's MultiLoRALinear) holds the layer it wraps as `base_layer`
and adds something to its output. Wrappers stack (a per-request adapter over a LoRA adapter over a quantized
linear), and `base_linears` looks through any number of them: a base linear is known by its *plain* name, the
name it has in the bare model (`model.layers.0.self_attn.q_proj`), whatever wraps it. Anything a wrapper holds
beside its `base_layer` (lora_A, lora_B, ...) is the wrapper's own and never a base linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BASE_LAYER = "base_layer"


class LinearWrapper(nn.Module):
    """A module around a linear layer (or around another wrapper), kept as `base_layer`; it reads as a linear:
    `in_features`, `out_features` and `weight` are the wrapped layer's (assigning `weight` assigns it there)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # nn.Module's own __setattr__ would try to register a parameter here
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)


def plain_name(name: str) -> str:
    """A module or parameter name with the wrappers' `base_layer` steps taken out."""
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` (dotted, e.g. `lm_head` or `model.layers.0.mlp.up_proj`) is;
    returns the module it replaces."""
    if not name:
        raise ValueError("replace_module needs the dotted name of a submodule; the model itself cannot be "
                         "replaced in place")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {parent_name!r} (replacing {name!r})") from None
    old = parent._modules.get(child)
    if old is None:
        children = list(parent._modules)
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}; "
                         f"{parent_name or 'the model'} has {children}")
    setattr(parent, child, new)
    return old


@dataclass(frozen=True)
class BaseLinear:
    """One of the model's own linear layers: its plain name, where the layer itself sits (the plain name with
    one `.base_layer` per wrapper around it), and the layer (an nn.Linear or a subclass such as QuantizedLinear)."""

    name: str
    path: str
    module: nn.Linear


def base_linears(model: nn.Module) -> list[BaseLinear]:
    """The model's linear layers in module order, looking through wrappers (never a wrapper's lora_A/lora_B)."""
    found: list[BaseLinear] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str, path: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, LinearWrapper):
            visit(module.base_layer, name, f"{path}.{BASE_LAYER}" if path else BASE_LAYER)
        elif isinstance(module, nn.Linear):
            if name:  # the model itself cannot be replaced in place, so it is not listed
                found.append(BaseLinear(name, path, module))
        else:
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name,
                      f"{path}.{child_name}" if path else child_name)

    visit(model, "", "")
    return found
