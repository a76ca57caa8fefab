"""Structured pruning: whole attention key/value groups and FFN neurons removed, leaving a smaller dense model.

* heads: a unit is a key/value group, the key/value head and the query heads that share it (under MHA, one
  head). Every layer keeps the same number of groups (transformers' Llama/Qwen2 configs have one head count for
  all layers) but chooses which by its own scores. The q/k norms of Qwen3 act per head_dim and stay whole.
* ffn: a unit is a neuron, a row of gate_proj and up_proj and the matching column of down_proj; again the
  same count in every layer, chosen per layer.

What holds a unit is read from each linear's role (danlu.models.roles): a column linear (q/k/v/gate/up) holds it
in its output rows and bias, a row linear (o/down) in its input columns, its bias staying whole. The linears are
replaced by smaller ones with danlu.tuning.surgery.replace_module; the model's config is replaced to match.

Scores (higher = kept):
* with calibration batches, the Frobenius norm over all calibration tokens of the unit's contribution to the
  residual stream: for a group, its heads' outputs through their o_proj columns; for a neuron, its activation
  times its down_proj column (exactly ||activation||_2 * ||column||_2). Removing a unit removes that term;
* without, a weight-magnitude fallback: the Frobenius norm of all the weights that belong to the unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from danlu.checkpoints.hf import writable_family
from danlu.models.config import ModelConfig
from danlu.models.roles import COLUMN, role_of
from danlu.models.transformer import Transformer
from danlu.pruning.sparsity import check_sparsity, round_half_up
from danlu.tuning.surgery import base_linears, replace_module

ATTENTION, MLP = "self_attn", "mlp"  # the block's parts whose units are pruned
UNIT_NAMES = {ATTENTION: "key/value groups", MLP: "FFN neurons"}


@dataclass
class Pruned:
    """What a structured pruning did: the model's new config, and per layer the indices of the units it kept
    (ascending, in the unpruned model's numbering) [layers, kept]."""

    config: ModelConfig
    kept: torch.Tensor
    total: int  # units per layer before

    @property
    def removed(self) -> int:
        return self.total - self.kept.shape[1]


def unit_count(config: ModelConfig, part: str) -> int:
    return config.num_key_value_heads if part == ATTENTION else config.intermediate_size


def kept_unit_count(total: int, sparsity: float, part: str, flag: str = "sparsity") -> int:
    """Units each layer keeps when the fraction `sparsity` of its `total` goes, rounded to whole units (half
    up); removing them all is refused, naming `flag`."""
    sparsity = check_sparsity(sparsity, flag)
    removed = round_half_up(sparsity * total)
    if removed >= total:
        largest = (total - 0.5) / total
        raise ValueError(f"{flag} {sparsity:g} removes all {total} {UNIT_NAMES[part]} of each layer; "
                         f"it must be below {largest:g} for this model")
    return total - removed


# ---------------------------------------------------------------- scores

@torch.no_grad()
def activation_scores(model: Transformer, batches: Iterable[torch.Tensor], part: str) -> torch.Tensor:
    """[layers, units]: each unit's contribution norm over the calibration batches (token ids [batch, seq])."""
    config = model.config
    blocks = list(model.model.layers)
    units = unit_count(config, part)
    squares = torch.zeros(len(blocks), units)
    hooks = [getattr(block, part).get_submodule("o_proj" if part == ATTENTION else "down_proj")
             .register_forward_pre_hook(_accumulate_squares(squares[i], units, part)) for i, block in enumerate(blocks)]
    count = 0
    try:
        for batch in batches:
            model(batch.to(next(model.parameters()).device))
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise ValueError("the calibration data holds no batch")
    if part == MLP:  # ||a_j||^2 was summed; the contribution of neuron j is a_j times its down_proj column
        columns = torch.stack([block.mlp.down_proj.weight.detach().float().pow(2).sum(0).cpu() for block in blocks])
        squares *= columns
    return squares.sqrt()


def _accumulate_squares(into: torch.Tensor, units: int, part: str):
    def hook(module: nn.Module, args: tuple):
        x = args[0].detach().float()
        if part == MLP:  # down_proj's input: one activation per neuron
            into.add_(x.pow(2).flatten(0, -2).sum(0).cpu())
            return
        # o_proj: the group's heads times their o_proj columns, summed over tokens and output features
        groups = x.unflatten(-1, (units, -1))
        weight = module.weight.detach().float().unflatten(1, (units, -1))
        contribution = torch.einsum("bsgd,ogd->bsgo", groups, weight)
        into.add_(contribution.pow(2).sum((0, 1, 3)).cpu())
    return hook


@torch.no_grad()
def weight_scores(model: Transformer, part: str) -> torch.Tensor:
    """[layers, units]: the Frobenius norm of every weight that belongs to the unit (no calibration data)."""
    units = unit_count(model.config, part)
    rows = []
    for block in model.model.layers:
        squares = torch.zeros(units)
        for linear in base_linears(getattr(block, part)):
            weight = linear.module.weight.detach().float().pow(2)
            along_units = weight if role_of(linear.name) == COLUMN else weight.T
            squares += along_units.reshape(units, -1).sum(1).cpu()
        rows.append(squares.sqrt())
    return torch.stack(rows)


def unit_scores(model: Transformer, part: str, batches: Optional[Iterable[torch.Tensor]] = None) -> torch.Tensor:
    return weight_scores(model, part) if batches is None else activation_scores(model, batches, part)


def most_important(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Per layer, the indices of the `keep` highest scores, ascending: [layers, keep]."""
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


# ---------------------------------------------------------------- slicing

@torch.no_grad()
def keep_units(model: Transformer, part: str, kept: torch.Tensor) -> None:
    """Replace, in place, every layer's linears of `part` by smaller ones holding only the units kept[layer]
    (the model's config is not touched; see prune_heads / prune_neurons)."""
    units = unit_count(model.config, part)
    blocks = list(model.model.layers)
    if kept.shape[0] != len(blocks):
        raise ValueError(f"kept has {kept.shape[0]} rows; the model has {len(blocks)} layers")
    for block, indices in zip(blocks, kept):
        module = getattr(block, part)
        for linear in base_linears(module):
            _check_plain(linear)
            replace_module(module, linear.name, sliced_linear(linear.module, role_of(linear.name), indices, units))


def _check_plain(linear) -> None:
    if linear.path != linear.name or type(linear.module) is not nn.Linear:
        raise ValueError(f"{linear.name} is wrapped or quantized ({type(linear.module).__name__}); structured "
                         f"pruning needs the plain model: prune before adding adapters or quantizing")


def sliced_linear(linear: nn.Linear, role: str, indices: torch.Tensor, units: int) -> nn.Linear:
    """A new linear holding the units `indices` of `linear`: its rows (column role) or columns (row role)."""
    dim = 0 if role == COLUMN else 1
    unit_size = linear.weight.shape[dim] // units
    index = (indices[:, None] * unit_size + torch.arange(unit_size)).flatten().to(linear.weight.device)
    weight = linear.weight.index_select(dim, index)
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.index_select(0, index)
    elif bias is not None:
        bias = bias.clone()  # a row linear's bias is added once after the sum over all units
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


# ---------------------------------------------------------------- the two prunings

def prune_heads(model: Transformer, sparsity: float, batches: Optional[Iterable[torch.Tensor]] = None,
                flag: str = "sparsity") -> Pruned:
    """Remove the fraction `sparsity` of every layer's key/value groups (rounded to whole groups), each layer
    its least important ones; in place. model.config becomes the returned config."""
    config = model.config
    keep = kept_unit_count(config.num_key_value_heads, sparsity, ATTENTION, flag)
    kept = most_important(unit_scores(model, ATTENTION, batches), keep)
    keep_units(model, ATTENTION, kept)
    group_size = config.num_attention_heads // config.num_key_value_heads
    model.config = writable_family(config.replace(num_attention_heads=keep * group_size, num_key_value_heads=keep,
                                                  head_dim=config.head_dim))
    return Pruned(model.config, kept, config.num_key_value_heads)


def prune_neurons(model: Transformer, sparsity: float, batches: Optional[Iterable[torch.Tensor]] = None,
                  flag: str = "sparsity") -> Pruned:
    """Remove the fraction `sparsity` of every layer's FFN neurons (rounded), each layer its least important
    ones; in place. model.config becomes the returned config."""
    config = model.config
    keep = kept_unit_count(config.intermediate_size, sparsity, MLP, flag)
    kept = most_important(unit_scores(model, MLP, batches), keep)
    keep_units(model, MLP, kept)
    model.config = config.replace(intermediate_size=keep)
    return Pruned(model.config, kept, config.intermediate_size)
