"""Int8 activations (W8A8, dynamic per row) on int8 per-row weights: the integer product equals the formula, stays
within a percent of the dequantized float product, is taken only where asked and where it pays (5 rows on, no
backward), and a quantized model keeps weight-only compute unless told."""
import pytest
import torch
from torch import nn

from danlu.quantization import kernels
from danlu.quantization.kernels import int8_activation_linear, pack_for_kernel
from danlu.quantization.linear import INT8_ACTIVATION_MIN_ROWS, WeightOnlyLinear
from danlu.quantization.transform import quantize, quantized_layers, use_int8_activations


def int8_layer(in_features=100, out_features=48, symmetric=True, bias=True):
    torch.manual_seed(0)
    return WeightOnlyLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), 8, None, symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_integer_product_is_the_per_row_formula_and_near_the_float_product(symmetric):
    layer = int8_layer(symmetric=symmetric)  # 100 inputs: the codes are padded to 112 columns
    weight = layer.quantized()
    x = torch.randn(7, 100) * 3
    scale = x.abs().amax(dim=1, keepdim=True) / 127  # per row, dynamic
    codes = torch.round(x / scale)
    expected = (codes.double() @ weight.codes[:, :100].double().t()) * scale.double() * weight.scales[:, 0].double()
    if not symmetric:
        expected += x.double().sum(dim=1, keepdim=True) * weight.zeros[:, 0].double()
    got = int8_activation_linear(x, pack_for_kernel(weight))
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    exact = x @ weight.dequantize().t()
    assert (got - exact).norm() / exact.norm() < 0.01


def test_a_layer_takes_int8_activations_only_when_asked_from_five_rows_and_never_for_a_backward(monkeypatch):
    layer = int8_layer()
    calls = []
    real = kernels.int8_activation_linear
    monkeypatch.setattr("danlu.quantization.linear.int8_activation_linear",
                        lambda x, w: calls.append(x.shape) or real(x, w))
    many, few = torch.randn(2, 3, 100), torch.randn(INT8_ACTIVATION_MIN_ROWS - 1, 100)
    weight_only = layer(many)
    assert calls == []  # off by default
    layer.int8_activations = True
    with torch.no_grad():
        w8a8 = layer(many)
        layer(few)
    assert calls == [torch.Size([2, 3, 100])] and not torch.equal(w8a8, weight_only)
    assert torch.allclose(w8a8, weight_only, rtol=0.05, atol=0.05)
    trained = layer(many.requires_grad_())
    assert calls == [torch.Size([2, 3, 100])] and trained.requires_grad  # the reference path has the backward


def test_use_int8_activations_turns_on_the_int8_per_row_layers_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize(model, "int4", group_size=32, head="int8")
    assert use_int8_activations(model) == 0  # int4 layers: no integer product for them
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize(model, "int8")
    assert not any(layer.int8_activations for layer in quantized_layers(model).values())
    assert use_int8_activations(model) == 2 and all(layer.int8_activations for layer in quantized_layers(model).values())
    assert use_int8_activations(model, False) == 2 and not any(layer.int8_activations for layer in quantized_layers(model).values())
