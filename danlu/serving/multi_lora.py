"""Several LoRA adapters beside one base model, chosen per batch row, so requests for different
adapters decode in the same batch (one adapter per user, stored apart, as the LoRA article describes)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from danlu.checkpoints.adapters import read_peft_adapter
from danlu.checkpoints.errors import CheckpointError


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


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: RowAdapters):
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.base_layer.weight
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
        config, state = read_peft_adapter(path)
        whole = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
        if whole:
            raise CheckpointError(f"{path}: the adapter also replaces whole weights ({whole[0]}, from "
                                  f"additional_target); such an adapter cannot be chosen per request: merge it "
                                  f"with `danlu export` and serve the result")
        scaling = float(config["lora_alpha"]) / int(config["r"])
        modules = {key.rsplit(".", 2)[0] for key in state}
        for module_name in sorted(modules):
            try:
                module = self.model.get_submodule(module_name)
            except AttributeError:
                raise CheckpointError(f"{path}: adapter targets {module_name!r}, which this model lacks") from None
            if isinstance(module, nn.Linear):
                parent_name, _, child = module_name.rpartition(".")
                module = MultiLoRALinear(module, self.rows)
                setattr(self.model.get_submodule(parent_name), child, module)
            a, b = state[f"{module_name}.lora_A.weight"], state[f"{module_name}.lora_B.weight"]
            if a.shape[1] != module.base_layer.in_features or b.shape[0] != module.base_layer.out_features:
                raise CheckpointError(f"{path}: {module_name} adapter shapes {tuple(a.shape)}, {tuple(b.shape)} "
                                      f"do not fit the layer")
            module.add(name, a, b, scaling)
        self.names.append(name)

    def set_rows(self, names: list[Optional[str]]) -> None:
        self.rows.set(names)
