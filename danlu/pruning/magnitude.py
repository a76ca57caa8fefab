"""Unstructured magnitude pruning: the smallest weights of the model's linear layers set to zero.

Zeros save neither time nor memory here: dense CPU (and GPU) kernels multiply them like any other value, and the
model keeps its shape and its checkpoint its size. What it gives is a sparse model to study, to fine-tune with
its mask, or to hand to a sparse runtime; a smaller dense model is `danlu.pruning.structured`'s work.
"""
from __future__ import annotations

import torch
from torch import nn

from danlu.models.roles import VOCAB, role_of
from danlu.pruning.sparsity import check_sparsity
from danlu.tuning.surgery import base_linears

SCOPES = ("layer", "global")


def prunable_linears(model: nn.Module, head: bool = False) -> list[nn.Linear]:
    """The model's own float linear layers (through wrappers); the output head only with head=True (the token
    embedding is not a linear and is never pruned, but a tied head shares its matrix)."""
    layers = []
    for linear in base_linears(model):
        if role_of(linear.name) == VOCAB and not head:
            continue
        if not linear.module.weight.is_floating_point():
            raise ValueError(f"{linear.name} holds quantized weights; prune before quantizing")
        layers.append(linear.module)
    return layers


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, scope: str = "layer", head: bool = False) -> float:
    """Zero, in place, the fraction `sparsity` of the linear weights with the smallest |w|; return the sparsity
    reached (zeros / weights over the pruned layers).

    scope "layer": each layer loses that fraction of its own weights; "global": one threshold over all of them,
    so layers with small weights lose more. Weights tied at the threshold all go, so the sparsity reached can
    pass the target by those ties (the zeros a model already has among them). Biases are kept.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    weights = [linear.weight for linear in prunable_linears(model, head)]
    if not weights:
        raise ValueError("the model has no linear layers to prune")
    if scope == "global":
        threshold = magnitude_threshold(torch.cat([w.detach().abs().flatten().float() for w in weights]), sparsity)
        for weight in weights:
            zero_below(weight, threshold)
    else:
        for weight in weights:
            zero_below(weight, magnitude_threshold(weight.detach().abs().flatten().float(), sparsity))
    zeros = sum(int((w == 0).sum()) for w in {id(w): w for w in weights}.values())
    return zeros / sum(w.numel() for w in {id(w): w for w in weights}.values())


def magnitude_threshold(magnitudes: torch.Tensor, sparsity: float):
    """The k-th smallest magnitude for k = round(sparsity * n); None when nothing is to go."""
    count = round(sparsity * magnitudes.numel())
    if count == 0:
        return None
    return magnitudes.kthvalue(count).values


def zero_below(weight: torch.Tensor, threshold) -> None:
    if threshold is not None:
        weight.masked_fill_(weight.abs().float() <= threshold, 0)
