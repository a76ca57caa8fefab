"""Several LoRA adapters beside one base model, chosen per batch row, so requests for different
adapters decode in the same batch (one adapter per user, stored apart, as the LoRA article describes).

A per-request adapter wraps whatever sits at the layer's name: a plain or quantized linear, or a layer that
already carries an adapter for every request (`--adapter`, unmerged), so a row asking for `b` gets
base + that adapter + b, and a row asking for none gets base + that adapter."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from danlu.checkpoints.adapters import read_adapter
from danlu.checkpoints.errors import CheckpointError
from danlu.tuning.lora import check_adapter_fits
from danlu.tuning.surgery import LinearWrapper, replace_module


class RowAdapters:
    """Which adapter each row of the current batch uses (None = the base model); shared by all layers."""

    def __init__(self):
        self.groups: dict[str, torch.Tensor] = {}

    def set(self, names: list[Optional[str]]) -> None:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self.groups = {name: torch.tensor(index) for name, index in rows.items()}


class MultiLoRALinear(LinearWrapper):
    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__(base)
        self.rows = rows
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.weight
        self.adapters[name] = (a.to(w.device, w.dtype), b.to(w.device, w.dtype), scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name, index in self.rows.groups.items():
            if name not in self.adapters:
                continue
            a, b, scaling = self.adapters[name]
            index = index.to(x.device)
            delta = (x.index_select(0, index) @ a.t()) @ b.t() * scaling
            out = out.index_add(0, index, delta)
        return out


class MultiLoRA:
    """The adapters served beside a model; `set_rows` picks them per row before each forward pass."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = RowAdapters()
        self.names: list[str] = []

    @classmethod
    def load(cls, model: nn.Module, adapters: dict[str, str]) -> "MultiLoRA":
        multi = cls(model)
        for name, path in adapters.items():
            multi.add(name, path)
        return multi

    def add(self, name: str, path: str) -> None:
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already served")
        adapter = read_adapter(path)
        if adapter.saved_state:
            whole = next(iter(adapter.saved_state))
            raise CheckpointError(f"{path}: the adapter also replaces whole weights ({whole}, from "
                                  f"additional_target); such an adapter cannot be chosen per request: merge it "
                                  f"with `danlu export` and serve the result")
        check_adapter_fits(self.model, adapter, path)  # before any layer changes
        for module_name in adapter.modules():
            module = self.model.get_submodule(module_name)  # the outermost of what wraps the linear, if any
            if not isinstance(module, MultiLoRALinear):
                module = MultiLoRALinear(module, self.rows)
                replace_module(self.model, module_name, module)
            module.add(name, adapter.lora_state[f"{module_name}.lora_A.weight"],
                       adapter.lora_state[f"{module_name}.lora_B.weight"], adapter.config.scaling)
        self.names.append(name)

    def set_rows(self, names: list[Optional[str]]) -> None:
        self.rows.set(names)
