"""`quantize(model, "int8" | "int4", ...)`: replace the model's linear layers with ones that keep their
weight quantized and compute on it (weight-only, round to nearest), in place.

Defaults: int8 per output row and symmetric, int4 in groups of 64 input features with a zero point. The
output head is quantized to int8 per row by default whatever the method (it is a fifth of SmolLM2's
weights, so it matters for speed, and llama.cpp's 4-bit files keep it at 8 bits for quality); `head="float"`
keeps it exact, `head="int4"` follows the body. The token embedding is a lookup, not a product, and stays
as it is. A tied head becomes a quantized copy; the embedding keeps the float matrix.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from danlu.quantization.linear import WeightOnlyLinear
from danlu.quantization.weights import QuantizedWeight, kernel_ready
from danlu.tuning.surgery import base_linears, replace_module

METHODS = {"int8": 8, "int4": 4}
# int8's 255 levels leave little to gain from a zero point (and the kernel has none); int4's 16 levels do better
# placed between each group's minimum and maximum (the GGUF Q4_1 and torchao int4 choice).
SYMMETRIC = {"int8": True, "int4": False}
HEAD_CHOICES = ("int8", "int4", "float")
DEFAULT_INT4_GROUP_SIZE = 64
HEAD_NAME = "lm_head"
HEAD_EXACT_TOP = 16  # logits recomputed exactly per row: the top candidates, where greedy decoding looks


def check_method(method: str, group_size: Optional[int]) -> int:
    if method not in METHODS:
        raise ValueError(f"--method: unknown quantization {method!r}; choose one of {sorted(METHODS)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"--group-size must be a positive number of input features, got {group_size}")
    if method == "int8" and group_size is not None:
        raise ValueError("--group-size: int8 is quantized per output row (the int8 kernel's layout); "
                         "group sizes are for --method int4")
    return METHODS[method]


def quantize(model: nn.Module, method: str = "int8", group_size: Optional[int] = None,
             symmetric: Optional[bool] = None, head: str = "int8", skip: tuple[str, ...] = ()) -> list[str]:
    """Quantize the model's plain linear layers in place (not those whose name ends with a `skip` entry);
    returns the names of the layers it replaced. symmetric None: each layer's method's default (SYMMETRIC)."""
    bits = check_method(method, group_size)
    if head not in HEAD_CHOICES:
        raise ValueError(f"--head: unknown choice {head!r}; choose one of {list(HEAD_CHOICES)}")
    if bits == 4:
        group_size = group_size or DEFAULT_INT4_GROUP_SIZE
    replaced = []
    for linear in base_linears(model):
        if type(linear.module) is not nn.Linear or (skip and linear.name.endswith(tuple(skip))):
            continue
        layer_method, layer_group = method, group_size
        if linear.name == HEAD_NAME:
            if head == "float":
                continue
            layer_method, layer_group = head, (group_size or DEFAULT_INT4_GROUP_SIZE if head == "int4" else None)
        layer_symmetric = SYMMETRIC[layer_method] if symmetric is None else symmetric
        layer = WeightOnlyLinear.from_linear(linear.module, METHODS[layer_method], layer_group, layer_symmetric)
        replace_module(model, linear.path, mark_head(layer, linear.name))
        replaced.append(linear.name)
    return replaced


def mark_head(layer: WeightOnlyLinear, name: str) -> WeightOnlyLinear:
    """An output head recomputes its top logits exactly (WeightOnlyLinear._recompute_top)."""
    if name == HEAD_NAME:
        layer.exact_top = HEAD_EXACT_TOP
    return layer


def use_int8_activations(model: nn.Module, on: bool = True) -> int:
    """Quantize activations too (per row, dynamic: kernels.int8_activation_linear) in the int8 per-row layers, from
    a few rows on (a batch, a prefill); returns how many layers take them. Faster from 8 rows (2x at a prefill) but
    not the default: without SmoothQuant's smoothing, SmolLM2's outlier channels (a row's largest activation is
    20-57x its mean) cost +2.9% perplexity (26.15 -> 26.91) against +0% for weight-only int8."""
    layers = [layer for layer in quantized_layers(model).values()
              if layer.bits == 8 and layer.group_size == layer.in_features]
    for layer in layers:
        layer.int8_activations = on
    return len(layers)


def quantized_layers(model: nn.Module) -> dict[str, WeightOnlyLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}


def prepare_kernels(model: nn.Module) -> None:
    """Build every quantized layer's kernel layout now (so the first generated token pays nothing for it)."""
    for layer in quantized_layers(model).values():
        layer.prepare()


def install_quantized(model: nn.Module, state: dict) -> dict:
    """Put a WeightOnlyLinear wherever `state` gives a linear's weight as a QuantizedWeight (a quantized
    checkpoint being loaded); returns the state with those entries under the new layers' own names
    (`qweight`, `scales`, `zeros`), ready for `load_state_dict`."""
    loadable = {}
    for name, value in state.items():
        if not isinstance(value, QuantizedWeight):
            loadable[name] = value
            continue
        module_name = name.removesuffix(".weight")
        bias = state.get(f"{module_name}.bias")
        layer = WeightOnlyLinear.from_quantized(kernel_ready(value), bias)
        replace_module(model, module_name, mark_head(layer, module_name))
        loadable.update({f"{module_name}.{key}": tensor for key, tensor in layer.state_dict().items()})
    return loadable


def quantized_state_dict(model: nn.Module) -> dict:
    """The model's state under its plain names, a quantized layer's weight as one QuantizedWeight (what a
    quantized checkpoint writer takes) instead of its qweight/scales/zeros buffers."""
    layers = quantized_layers(model)
    buffers = {f"{name}.{key}" for name, layer in layers.items() for key in ("qweight", "scales", "zeros")}
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in buffers}
    state.update({f"{name}.weight": layer.quantized() for name, layer in layers.items()})
    return state
