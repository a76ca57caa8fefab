"""DynaBERT (Hou et al., 2020): one network that runs at several widths and depths, sharing its weights.

* `importance(model, batches, loss_fn)`: a first-order estimate of how much the loss changes when an
  attention head (a whole key/value group under GQA) or an FFN neuron is removed;
* `rewire(model, importance)`: every layer's heads and neurons permuted in place, most important first,
  so that every width keeps the most important ones (the function the model computes is unchanged);
* `sub_network(model, width, depth)`: the model run at that size on views of its own parameters, so a loss
  at any size trains the shared weights;
* `extract(model, width, depth)`: a standalone smaller Transformer holding copies of those slices.

What a width m_w keeps in every layer, its leftmost units:
* attention: round(m_w * num_key_value_heads) whole key/value groups, each with all its query heads (under
  MHA every group is one head); a width that keeps no group is refused;
* FFN: max(1, round(m_w * intermediate_size)) neurons.
round() here is half up (0.5 -> 1), not Python's half-to-even.
What a depth m_d keeps: see `kept_layers`.

Parameters are found by their names and roles (danlu.models.roles), never by the model's classes: a column
linear (q/k/v/gate/up) holds its units along its output rows and bias, a row linear (o/down) along its input
columns, its bias staying whole. Norms (q/k norms included) are per layer, never cut.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.func import functional_call

from danlu.checkpoints.hf import writable_family
from danlu.distillation.students import LAYER_PREFIX, renumbered_layers
from danlu.models.config import ModelConfig
from danlu.models.roles import COLUMN, ROW, role_of
from danlu.models.transformer import Transformer, build_meta_model

WIDTHS = (1.0, 0.75, 0.5, 0.25)
DEPTHS = (1.0, 0.75, 0.5)

ATTENTION, MLP = "self_attn", "mlp"  # the parts of a layer whose units a width cuts


# ---------------------------------------------------------------- sizes

def grid(widths: Iterable[float] = WIDTHS, depths: Iterable[float] = DEPTHS) -> list[tuple[float, float]]:
    """Every (width, depth) pair, depth by depth, widest first."""
    widths, depths = tuple(widths), tuple(depths)
    for width in widths:
        _check_multiplier("width", width, WIDTHS)
    for depth in depths:
        _check_multiplier("depth", depth, DEPTHS)
    return [(width, depth) for depth in depths for width in widths]


def kept_layers(num_layers: int, depth: float) -> list[int]:
    """The layers a depth m_d keeps: round(m_d * num_layers) of them, the i-th being layer floor(i / m_d).

    On DynaBERT's depths this is its rule "drop layer d (0-based) when (d + 1) mod (1 / m_d) == 0": of 12 layers
    m_d 0.5 keeps 0, 2, ..., 10 and m_d 0.75 drops 3, 7 and 11. Unlike that rule read literally, it keeps every
    layer at m_d 1.0 and spreads the kept layers evenly at any other depth.
    """
    _check_multiplier("depth", depth, DEPTHS)
    count = _round_half_up(depth * num_layers)
    if count == 0:
        raise ValueError(f"depth {depth} keeps none of the {num_layers} layers; depth must be in "
                         f"[{0.5 / num_layers:g}, 1] (DynaBERT's depths: {list(DEPTHS)})")
    exact = Fraction(str(depth))  # 0.75 as 3/4 exactly, so that i / m_d lands on whole numbers
    return [math.floor(i / exact) for i in range(count)]


def kept_units(config: ModelConfig, width: float) -> tuple[int, int]:
    """(key/value groups, FFN neurons) that a width keeps in each layer."""
    _check_multiplier("width", width, WIDTHS)
    groups = _round_half_up(width * config.num_key_value_heads)
    if groups == 0:
        raise ValueError(
            f"width {width} keeps none of the {config.num_key_value_heads} key/value groups of each layer; width "
            f"must be in [{0.5 / config.num_key_value_heads:g}, 1] for this model (DynaBERT's widths: {list(WIDTHS)})")
    return groups, max(1, _round_half_up(width * config.intermediate_size))


def sub_config(config: ModelConfig, width: float, depth: float) -> ModelConfig:
    """The configuration of the sub-network at (width, depth); a Llama whose fewer heads transformers' LlamaConfig
    would refuse is labelled Mistral (see extract)."""
    groups, neurons = kept_units(config, width)
    group_size = config.num_attention_heads // config.num_key_value_heads
    return writable_family(config.replace(
        num_hidden_layers=len(kept_layers(config.num_hidden_layers, depth)),
        num_attention_heads=groups * group_size,
        num_key_value_heads=groups,
        intermediate_size=neurons,
        head_dim=config.head_dim,  # explicit: hidden_size need not divide by the fewer heads
    ))


def _check_multiplier(name: str, value: Any, grid_values: tuple) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (DynaBERT's {name}s: {list(grid_values)}), "
                         f"got {value!r}")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


# ---------------------------------------------------------------- where a parameter's units are

@dataclass(frozen=True)
class _Place:
    """Where a parameter of the model sits, by its name.

    layer: its layer index, None outside the layers (embeddings, final norm, head);
    local: its name within the layer ('mlp.up_proj.weight'), or the whole name outside the layers;
    part: ATTENTION (units: key/value groups) or MLP (units: neurons) if a width cuts it, else None;
    dim: the dimension along which it holds those units.
    """

    layer: Optional[int]
    local: str
    part: Optional[str] = None
    dim: Optional[int] = None


def _place(name: str) -> _Place:
    if not name.startswith(LAYER_PREFIX):
        return _Place(None, name)
    index, _, local = name[len(LAYER_PREFIX):].partition(".")
    pieces = local.split(".")
    if len(pieces) != 3 or pieces[0] not in (ATTENTION, MLP):
        return _Place(int(index), local)
    part, module, kind = pieces
    role = role_of(module)
    if role == COLUMN:
        return _Place(int(index), local, part, 0)
    if role == ROW and kind == "weight":
        return _Place(int(index), local, part, 1)
    return _Place(int(index), local)  # a row linear's bias is added after the sum over all units


def _unit_counts(config: ModelConfig) -> dict[str, int]:
    return {ATTENTION: config.num_key_value_heads, MLP: config.intermediate_size}


def _unit_size(tensor: torch.Tensor, place: _Place, config: ModelConfig) -> int:
    """How many rows (or columns) of the tensor one unit spans: a group's heads * head_dim, or 1 per neuron."""
    return tensor.shape[place.dim] // _unit_counts(config)[place.part]


def _unit_index(order: torch.Tensor, unit_size: int) -> torch.Tensor:
    """The row (or column) indices of the units in `order`, unit after unit."""
    return (order[:, None] * unit_size + torch.arange(unit_size, device=order.device)).flatten()


# ---------------------------------------------------------------- importance

@dataclass
class Importance:
    """First-order importance summed over batches (float32).

    heads [layers, num_key_value_heads]: per key/value group, the sum over its query heads of |dL/d head_mask|;
    neurons [layers, intermediate_size]: |sum of w * dL/dw over the neuron's gate/up rows and biases|
    + |sum of w * dL/dw over its down_proj column|.
    """

    heads: torch.Tensor
    neurons: torch.Tensor


def importance(model: Transformer, batches: Iterable[Any],
               loss_fn: Callable[[Transformer, Any], torch.Tensor]) -> Importance:
    """Estimate each head's and neuron's importance: how much loss_fn(model, batch) changes, to first order, when
    it is removed (Michel et al. 2019 for heads, Molchanov et al. 2017 for neurons), summed over the batches.

    The model runs in the mode it is in (DynaBERT scores in eval mode). It is left as it was: the head masks are
    hooks removed on return, gradients are taken with torch.autograd.grad (no parameter's .grad is touched).
    """
    config = model.config
    layers, heads_per_layer = config.num_hidden_layers, config.num_attention_heads
    device = next(model.parameters()).device
    head_masks = torch.ones(layers, heads_per_layer, device=device, requires_grad=True)
    mlp_parameters = [(parameter, place) for name, parameter in model.named_parameters()
                      if (place := _place(name)).part == MLP]
    head_sum = torch.zeros(layers, heads_per_layer, device=device)
    neuron_sum = torch.zeros(layers, config.intermediate_size, device=device)
    with torch.enable_grad(), _heads_scaled_by(model, head_masks), _requiring_grad([p for p, _ in mlp_parameters]):
        for batch in batches:
            loss = loss_fn(model, batch)
            mask_grad, *weight_grads = torch.autograd.grad(loss, [head_masks, *(p for p, _ in mlp_parameters)])
            head_sum += mask_grad.abs()
            neuron_sum += _neuron_taylor_terms(mlp_parameters, weight_grads, neuron_sum.shape)
    group_size = heads_per_layer // config.num_key_value_heads
    return Importance(heads=head_sum.unflatten(1, (-1, group_size)).sum(-1), neurons=neuron_sum)


def _neuron_taylor_terms(mlp_parameters, grads, shape) -> torch.Tensor:
    """|sum of w * dL/dw into each neuron| + |sum of w * dL/dw out of it|, for one batch: [layers, neurons]."""
    into = torch.zeros(shape, device=grads[0].device)
    out_of = torch.zeros(shape, device=grads[0].device)
    for (parameter, place), grad in zip(mlp_parameters, grads):
        per_neuron = (parameter.detach().float() * grad.float()).movedim(place.dim, 0)
        per_neuron = per_neuron.reshape(per_neuron.shape[0], -1).sum(1)
        # dim 0: a column linear (gate/up, weight or bias) computing the neuron; dim 1: down_proj reading it.
        (into if place.dim == 0 else out_of)[place.layer] += per_neuron
    return into.abs() + out_of.abs()


@contextmanager
def _heads_scaled_by(model: Transformer, head_masks: torch.Tensor):
    """Inside, each layer's attention output is multiplied per query head by head_masks[layer] (at o_proj's
    input, where the heads are still apart)."""
    handles = [model.get_submodule(f"{LAYER_PREFIX}{layer}.{ATTENTION}.o_proj")
               .register_forward_pre_hook(_head_scaling_hook(head_masks, layer))
               for layer in range(model.config.num_hidden_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _head_scaling_hook(head_masks: torch.Tensor, layer: int):
    def scale(module: nn.Module, args: tuple):
        heads, *rest = args
        mask = head_masks[layer].to(heads.dtype)
        return (heads.unflatten(-1, (mask.shape[0], -1)) * mask[:, None]).flatten(-2), *rest
    return scale


@contextmanager
def _requiring_grad(parameters: list[torch.Tensor]):
    """Gradients can be taken for these parameters inside, even in a frozen model."""
    before = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(parameters, before):
            p.requires_grad_(flag)


# ---------------------------------------------------------------- rewiring

@torch.no_grad()
def rewire(model: Transformer, importance: Importance) -> None:
    """Permute, in place, every layer's key/value groups (q rows of the group's query heads, k/v rows of its
    key/value head, o columns) and FFN neurons (gate/up rows, down columns), most important first. Biases of
    column linears move with their rows. The model computes the same function afterwards."""
    config = model.config
    _check_importance(importance, config)
    orders = {ATTENTION: importance.heads.argsort(dim=1, descending=True, stable=True),
              MLP: importance.neurons.argsort(dim=1, descending=True, stable=True)}
    for name, parameter in model.named_parameters():
        place = _place(name)
        if place.part is None:
            continue
        order = orders[place.part][place.layer].to(parameter.device)
        index = _unit_index(order, _unit_size(parameter, place, config))
        parameter.copy_(parameter.index_select(place.dim, index))


def _check_importance(importance: Importance, config: ModelConfig) -> None:
    expected = {"heads": (config.num_hidden_layers, config.num_key_value_heads),
                "neurons": (config.num_hidden_layers, config.intermediate_size)}
    for field_name, shape in expected.items():
        actual = tuple(getattr(importance, field_name).shape)
        if actual != shape:
            raise ValueError(f"importance.{field_name} has shape {actual}; this model needs {shape} "
                             f"([layers, {'key/value groups' if field_name == 'heads' else 'intermediate_size'}])")


# ---------------------------------------------------------------- sub-networks

def _sliced_parameters(model: Transformer, width: float, depth: float) -> dict[str, torch.Tensor]:
    """The sub-network's parameters under its own names (the i-th kept layer is `model.layers.i`): views of the
    full model's, their leftmost units."""
    config = model.config
    kept = dict(zip((ATTENTION, MLP), kept_units(config, width)))
    sliced = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        place = _place(name)
        if place.part is not None:
            tensor = tensor.narrow(place.dim, 0, kept[place.part] * _unit_size(tensor, place, config))
        sliced[name] = tensor
    return renumbered_layers(sliced, kept_layers(config.num_hidden_layers, depth))


class SubNetwork:
    """The model at one (width, depth), computed on views of the model's own parameters: a loss on its output
    back-propagates into the full model's weights (only the kept slices get gradient).

    Call it as the model: sub(input_ids, attention_mask=..., intermediates=..., ...). `config` is the
    sub-network's, `layers` the full model's index of each kept layer (for matching hidden states).
    """

    def __init__(self, model: Transformer, width: float, depth: float):
        self.model = model
        self.width, self.depth = width, depth
        self.config = sub_config(model.config, width, depth)
        self.layers = kept_layers(model.config.num_hidden_layers, depth)
        self._template = build_meta_model(self.config)  # the smaller architecture, holding no weights of its own

    def shared_parameters(self) -> dict[str, torch.Tensor]:
        """The sub-network's parameters by its own names: views of the full model's."""
        return _sliced_parameters(self.model, self.width, self.depth)

    def __call__(self, *args, **kwargs):
        self._template.train(self.model.training)
        # Views taken at every call follow the parameters wherever the model has moved them since.
        return functional_call(self._template, self.shared_parameters(), args, kwargs, strict=True)

    def __repr__(self) -> str:
        return f"SubNetwork(width={self.width}, depth={self.depth}, layers={self.layers})"


def sub_network(model: Transformer, width: float = 1.0, depth: float = 1.0) -> SubNetwork:
    """The model at (width, depth), sharing its parameters; see SubNetwork."""
    return SubNetwork(model, width, depth)


@torch.no_grad()
def extract(model: Transformer, width: float, depth: float) -> Transformer:
    """A standalone Transformer of the sub-network at (width, depth): copies of the kept slices, layers numbered
    0..n-1, a ModelConfig with the smaller sizes. It saves as a plain smaller checkpoint of the same family.

    The config keeps head_dim explicit. transformers' Qwen2/Qwen3/Mistral configs take head counts that do not
    divide hidden_size; its LlamaConfig (5.x) refuses them even with head_dim, so such a Llama sub-network (6 of
    8 heads at hidden 64) is labelled Mistral, which computes the same when there are no biases.
    """
    small = build_meta_model(sub_config(model.config, width, depth))
    state = {name: tensor.detach().clone() for name, tensor in _sliced_parameters(model, width, depth).items()}
    tied = {"lm_head.weight"} if small.config.tie_word_embeddings and small.lm_head is not None else set()
    missing, unexpected = small.load_state_dict(state, strict=False, assign=True)
    if set(missing) != tied or unexpected:  # the tied head is the embedding, listed once
        raise RuntimeError(f"extract: the sliced weights do not fit the smaller model (missing {missing}, "
                           f"unexpected {unexpected})")
    small.tie_weights()
    return small.train(model.training)
