"""Freeze tuning: train only some layers (LLaMA-Factory's freeze_trainable_layers / _modules)."""
from __future__ import annotations

from torch import nn


def apply_freeze(model: nn.Module, trainable_layers: int, trainable_modules: str = "all") -> list[str]:
    """Train the last N layers (the first N when negative); returns the trainable parameter names."""
    n_layers = len(model.model.layers)
    if trainable_layers == 0 or abs(trainable_layers) > n_layers:
        raise ValueError(f"freeze_trainable_layers must be between -{n_layers} and {n_layers}, not 0; "
                         f"got {trainable_layers}")
    layers = range(n_layers - trainable_layers, n_layers) if trainable_layers > 0 else range(-trainable_layers)
    prefixes = [f"model.layers.{i}." for i in layers]
    modules = [m.strip() for m in trainable_modules.split(",") if m.strip()]
    trainable = []
    for name, p in model.named_parameters():
        keep = any(name.startswith(prefix) for prefix in prefixes)
        if keep and modules != ["all"]:
            keep = any(f".{m}." in name for m in modules)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"freeze_trainable_modules {trainable_modules!r} matches no parameter in the trainable "
                         f"layers; use 'all' or names like mlp,self_attn")
    return trainable
