"""`factorize(model, energy=... | rank=..., targets=...)`: replace linear layers by LowRankLinear, in place.

Each target's weight W [out, in] is decomposed (danlu.low_rank.svd) and kept at a rank chosen per layer: the
smallest whose singular values hold `energy` of sum(S^2) (rounded up to `multiple_of`), or the fixed `rank`. A
layer is factorized only where the two factors hold fewer weights than W (rank * (out + in) < out * in); at a
larger rank it is left dense and its report says so. Targets are named as LoRA's lora_target names them
(danlu.tuning.lora.resolve_targets): a layer's own name (`q_proj`), its full name, or "all" (default): every
linear with a column or row role, not the output head. Biases stay whole, on the `b` factor.

`densify(model)` puts plain linears holding B @ A back (a model transformers loads, with no saving left).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from danlu.low_rank.linear import LowRankLinear, factorized_layers
from danlu.low_rank.svd import (check_energy, check_rank, energy_kept, energy_rank, factored_parameters,
                                low_rank_factors, saves_parameters, singular_value_decomposition, singular_values)
from danlu.models.roles import VOCAB, role_of
from danlu.tuning.lora import resolve_targets
from danlu.tuning.surgery import base_linears, replace_module

ALL = ("all",)


@dataclass(frozen=True)
class LayerFactorization:
    """What factorize did to one layer. `rank` is the rank chosen; a layer left dense (`factorized` False)
    keeps its matrix, because factors of that rank would hold as many weights or more."""
    name: str
    out_features: int
    in_features: int
    rank: int
    energy: float  # fraction of sum(S^2) the chosen rank keeps (1.0 for a dense layer: it keeps W itself)
    params_before: int  # weights and bias
    params_after: int
    factorized: bool


def check_choice(energy, rank, energy_name: str = "energy", rank_name: str = "rank") -> None:
    """Exactly one of energy and rank, each valid; errors name the arguments as given (the CLI: its flags)."""
    if (energy is None) == (rank is None):
        raise ValueError(f"give one of {energy_name} and {rank_name} "
                         f"({'not both' if energy is not None else 'neither was given'})")
    if energy is not None:
        check_energy(energy, energy_name)
    else:
        check_rank(rank, rank_name)


def factorization_targets(model: nn.Module, targets: Optional[Sequence[str]] = None,
                          flag: str = "targets") -> list[str]:
    """Plain names of the linears to factorize, in module order (see the module's docstring)."""
    names = resolve_targets(model, list(targets or ALL), flag)
    heads = [name for name in names if role_of(name) == VOCAB]
    if heads:
        raise ValueError(f"{flag}: {heads[0]} is the output head; factorize the block's linears (q_proj ... "
                         f"down_proj) and leave the head whole")
    return names


@torch.no_grad()
def factorize(model: nn.Module, energy: Optional[float] = None, rank: Optional[int] = None,
              targets: Optional[Sequence[str]] = None, multiple_of: int = 1) -> list[LayerFactorization]:
    """Factorize the target linears in place (see the module's docstring); one report per target, factorized or
    left dense, in module order. `multiple_of` rounds the rank the energy rule picks up to its multiple."""
    check_choice(energy, rank)
    check_rank(multiple_of, "multiple_of")
    names = factorization_targets(model, targets)
    linears = {linear.name: linear for linear in base_linears(model)}
    for name in names:
        linear = linears[name]
        if linear.path != name or type(linear.module) is not nn.Linear:
            raise ValueError(f"{name} is wrapped or quantized ({type(linear.module).__name__}); factorize the "
                             f"plain model, before adding adapters or quantizing")
    return [_factorize_layer(model, name, linears[name].module, energy, rank, multiple_of) for name in names]


def _factorize_layer(model: nn.Module, name: str, linear: nn.Linear, energy, rank, multiple_of) -> LayerFactorization:
    weight, bias = linear.weight, linear.bias
    out_features, in_features = weight.shape
    # The rank first (from the singular values alone, or given), so that a layer left dense costs no full SVD.
    if energy is not None:
        chosen = energy_rank(singular_values(weight), energy, multiple_of)
    else:
        chosen = min(rank, out_features, in_features)
    bias_size = bias.numel() if bias is not None else 0
    before = weight.numel() + bias_size
    if not saves_parameters(out_features, in_features, chosen):
        return LayerFactorization(name, out_features, in_features, chosen, 1.0, before, before, False)
    u, s, vh = singular_value_decomposition(weight)
    b, a = low_rank_factors(u, s, vh, chosen)
    layer = LowRankLinear.from_factors(b.to(weight.dtype).contiguous(), a.to(weight.dtype).contiguous(),
                                       None if bias is None else bias.detach().clone(), weight.requires_grad)
    replace_module(model, name, layer)
    return LayerFactorization(name, out_features, in_features, chosen, energy_kept(s, chosen), before,
                              factored_parameters(out_features, in_features, chosen) + bias_size, True)


def densify(model: nn.Module) -> list[str]:
    """Replace every LowRankLinear by a plain linear holding B @ A, in place; returns their names."""
    layers = factorized_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear())
    return list(layers)
