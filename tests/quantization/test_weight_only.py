"""Weight-only int8/int4 quantization: the round-to-nearest formulas, the packed kernels against the
reference product, the model transform and its bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from danlu.models.config import ModelConfig
from danlu.models.transformer import Transformer
from danlu.quantization.ggml_blocks import read_blocks
from danlu.quantization.kernels import pack_for_kernel
from danlu.quantization.linear import WeightOnlyLinear
from danlu.quantization.transform import quantize, quantized_layers, quantized_state_dict
from danlu.quantization.weights import QuantizedWeight, kernel_ready, pack_int4, quantize_weight, unpack_int4

KINDS = [(8, None, True), (8, None, False), (4, 32, True), (4, 32, False), (4, 64, False), (4, 128, True)]


def gaussian(out=96, inp=576, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits,group,symmetric", KINDS)
def test_round_trip_error_is_at_most_half_a_step(bits, group, symmetric):
    w = gaussian()
    q = quantize_weight(w, bits, group, symmetric)
    step = q.scales.repeat_interleave(q.group_size, dim=1)[:, :w.shape[1]]
    error = (q.dequantize() - w).abs()
    assert torch.all(error <= step / 2 + 1e-7)
    relative = (error.norm() / w.norm()).item()
    assert relative < (0.01 if bits == 8 else 0.12), relative


def test_symmetric_int8_is_absmax_per_row_and_keeps_zero_exact():
    w = gaussian(4, 64)
    w[0, 5] = 0.0
    q = quantize_weight(w, 8)
    assert torch.allclose(q.scales[:, 0], w.abs().amax(dim=1) / 127)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() == 127
    assert q.dequantize()[0, 5] == 0.0


def test_asymmetric_int4_represents_each_groups_minimum_exactly():
    w = gaussian(8, 64) + 0.3  # all positive: a symmetric grid would waste half its codes
    q = quantize_weight(w, 4, 32, symmetric=False)
    assert q.codes.dtype == torch.uint8 and int(q.codes.min()) == 0 and int(q.codes.max()) == 15
    minimum = w.view(8, 2, 32).amin(dim=2)
    assert torch.allclose(q.dequantize().view(8, 2, 32).amin(dim=2), minimum, atol=1e-6)
    sym = quantize_weight(w, 4, 32, symmetric=True)
    assert (q.dequantize() - w).norm() < (sym.dequantize() - w).norm()


def test_a_row_shorter_than_whole_groups_is_padded_and_cut_back():
    w = gaussian(16, 70)
    q = quantize_weight(w, 4, 32, symmetric=False)
    assert q.codes.shape == (16, 96) and q.scales.shape == (16, 3)
    assert q.dequantize().shape == (16, 70)
    assert (q.dequantize() - w).abs().max() <= q.scales.max() / 2 + 1e-7


def test_int4_packing_round_trips_two_codes_per_byte():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4
    assert torch.equal(unpack_int4(packed), codes)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.zeros(3), 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.zeros(2, 2), 4, -1)
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedWeight(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 2), None, 4, 32, 32)


@pytest.mark.parametrize("bits,group,symmetric", KINDS)
@pytest.mark.parametrize("out,inp", [(96, 576), (40, 70)])  # 40: not a multiple of 16; 70: not of the group
def test_kernel_equals_the_dequantized_reference_within_bf16(bits, group, symmetric, out, inp):
    linear = nn.Linear(inp, out, bias=True)
    with torch.no_grad():
        linear.weight.copy_(gaussian(out, inp))
    layer = WeightOnlyLinear.from_linear(linear, bits, group, symmetric)
    x = torch.randn(3, 5, inp)
    fast = layer(x)
    assert layer._kernel is not None, "the CPU kernel should take this weight"
    layer.use_kernel = False
    reference = layer(x)
    assert torch.allclose(reference, x @ layer.dequantize().T + linear.bias, atol=1e-5)
    # bf16 activations: a relative error of a few 2^-8
    assert (fast - reference).abs().max() <= 0.02 * reference.abs().max()
    assert fast.dtype == torch.float32 and fast.shape == (3, 5, out)


def test_training_through_a_quantized_layer_takes_the_reference_path_and_reaches_the_input():
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), 4, 32)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantize().sum(dim=0).expand(2, -1), atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_state_dict_round_trip_and_weight_assignment():
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 48), 4, 32, symmetric=False)
    again = WeightOnlyLinear(64, 48, True, 4, 32, symmetric=False)
    x = torch.randn(2, 64)
    again(x)  # its kernel layout is built from its own (zero) codes ...
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.dequantize(), layer.dequantize())
    assert torch.equal(again(x), layer(x))  # ... and built again from the loaded ones
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    assert layer.state_dict()["qweight"].shape == (48, 32)  # int4: two codes a byte
    target = gaussian(48, 64)
    again.weight = target  # quantizes again, with the layer's own settings
    assert torch.allclose(again.weight, quantize_weight(target, 4, 32, False).dequantize())
    with pytest.raises(ValueError, match="does not fit"):
        again.set_quantized(quantize_weight(target, 8))


def test_moving_the_model_to_bf16_keeps_codes_and_float32_scales():
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), 8).to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def tiny_model(tie=True):
    config = ModelConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_quantize_replaces_every_linear_and_logits_stay_close(method, group):
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids)
    names = quantize(model, method, group)
    assert len(names) == 2 * 7 + 1 and names[-1] == "lm_head"
    layers = quantized_layers(model)
    assert layers["lm_head"].bits == 8  # the head defaults to int8 whatever the body
    assert layers["model.layers.0.mlp.up_proj"].bits == (8 if method == "int8" else 4)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # a lookup stays float
    with torch.no_grad():
        after = model(ids)
    relative = ((after - before).norm() / before.norm()).item()
    assert relative < (0.02 if method == "int8" else 0.15), relative


def test_int8_defaults_to_symmetric_and_int4_to_a_zero_point():
    model = tiny_model()
    quantize(model, "int4")
    layers = quantized_layers(model)
    assert not layers["model.layers.0.mlp.up_proj"].symmetric and layers["model.layers.0.mlp.up_proj"].group_size == 64
    assert layers["lm_head"].symmetric and layers["lm_head"].exact_top == 16
    model = tiny_model()
    quantize(model, "int8")
    assert quantized_layers(model)["model.layers.0.mlp.up_proj"].symmetric


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_a_head_recomputes_its_top_logits_exactly(bits, group):
    torch.manual_seed(1)
    head = WeightOnlyLinear.from_linear(nn.Linear(576, 4096, bias=False), bits, group)
    x = torch.randn(3, 2, 576) * 4
    head.use_kernel = False
    exact = head(x)
    head.use_kernel = True
    rough = head(x)
    head.exact_top = 16
    refined = head(x)
    top = exact.topk(16, dim=-1).indices
    assert torch.allclose(refined.gather(-1, top), exact.gather(-1, top), atol=1e-4)
    assert not torch.allclose(rough.gather(-1, top), exact.gather(-1, top), atol=1e-4)  # bf16 kernels are off
    assert torch.equal(refined.argmax(-1), exact.argmax(-1))


def test_head_can_stay_float_or_follow_the_body_and_skip_names_layers():
    model = tiny_model()
    names = quantize(model, "int4", 32, head="float", skip=("down_proj",))
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    model = tiny_model()
    quantize(model, "int4", 32, head="int4")
    assert quantized_layers(model)["lm_head"].bits == 4


def test_quantized_state_dict_holds_one_quantized_weight_per_layer():
    model = tiny_model(tie=False)
    quantize(model, "int4", 32, symmetric=False)
    state = quantized_state_dict(model)
    weight = state["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(weight, QuantizedWeight) and weight.bits == 4 and not weight.symmetric
    assert not any(k.endswith((".qweight", ".scales", ".zeros")) for k in state)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)


@pytest.mark.parametrize("method,group,message", [
    ("int3", None, "--method"), ("int4", 0, "--group-size"), ("int8", 32, "per output row")])
def test_quantize_refuses_bad_settings(method, group, message):
    with pytest.raises(ValueError, match=message):
        quantize(tiny_model(), method, group)
    with pytest.raises(ValueError, match="--head"):
        quantize(tiny_model(), "int8", head="int2")


# ---------------------------------------------------------------- ggml blocks

@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_blocks_read_as_codes_equal_ggufs_own_dequantization(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize as gguf_quantize

    w = gaussian(16, 96).numpy()
    blocks = gguf_quantize(w, GGMLQuantizationType[kind])
    q = read_blocks(blocks, kind, 16, 96)
    assert q.group_size == 32 and q.bits == (8 if kind == "Q8_0" else 4)
    assert q.symmetric == (kind != "Q4_1")
    expected = dequantize(blocks, GGMLQuantizationType[kind]).reshape(16, 96)
    np.testing.assert_array_equal(q.dequantize().numpy(), expected)


def test_ggml_blocks_bad_sizes_are_named():
    with pytest.raises(ValueError, match="whole blocks"):
        read_blocks(np.zeros(20, dtype=np.uint8), "Q4_1", 1, 40)
    with pytest.raises(ValueError, match="needs 40 bytes"):
        read_blocks(np.zeros(20, dtype=np.uint8), "Q4_1", 2, 32)
    with pytest.raises(ValueError, match="Q5_K"):
        read_blocks(np.zeros(20, dtype=np.uint8), "Q5_K", 1, 32)


def test_group_wise_int8_is_rounded_per_row_for_the_kernel_and_rows_permute():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    w = gaussian(32, 64).numpy()
    q8_0 = read_blocks(gguf_quantize(w, GGMLQuantizationType.Q8_0), "Q8_0", 32, 64)
    assert pack_for_kernel(q8_0) is None  # the int8 kernel has one scale per row
    per_row = kernel_ready(q8_0)
    assert per_row.group_size == 64 and pack_for_kernel(per_row) is not None
    step = per_row.scales[:, :1]
    assert torch.all((per_row.dequantize() - q8_0.dequantize()).abs() <= step / 2 + 1e-7)
    order = torch.randperm(32)
    assert torch.equal(q8_0.select_rows(order).dequantize(), q8_0.dequantize()[order])
    assert kernel_ready(per_row) is per_row
    assert math.isclose(q8_0.nbytes(), 32 * 64 + 4 * 32 * 2)
