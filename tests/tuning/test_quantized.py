"""QLoRA's quantized base: the NF4 table, round-trip error, logits, LoRA training on top, storage, export."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer, build_meta_model
from danlu.tuning.lora import LoRAConfig, apply_lora, count_trainable, linear_module_names, merge_lora
from danlu.tuning.quantized import (NF4_VALUES, QuantizedLinear, dequantize_model, dynamic_map,
                                    linear_weight_bytes, pack_nibbles, quantize_model, quantized_modules,
                                    unpack_nibbles)

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
# The NF4 levels as published with bitsandbytes (its create_normal_map and CUDA kernels, and torchao's NF4).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
KINDS = [(4, False), (4, True), (8, False)]  # (bits, double_quant)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny-llama")).eval()


def gaussian_linear(in_features, out_features, bias=False, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)  # the usual initialisation, and the distribution NF4 is made for
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear


def test_nf4_table_is_the_published_one_and_the_normal_quantiles_it_comes_from():
    assert list(NF4_VALUES) == PUBLISHED_NF4
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0, 1) quantiles and 0,
    # scaled to [-1, 1]; torch.special.ndtri is the inverse normal CDF.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.max()
    assert torch.allclose(levels.float(), torch.tensor(PUBLISHED_NF4), atol=1e-6)


def test_dynamic_map_for_double_quantization():
    table = dynamic_map()
    assert table.numel() == 256 and table.unique().numel() == 256
    assert torch.equal(table, table.sort().values) and table.max() == 1.0 and (table == 0).sum() == 1
    assert table.min() > -1 and table.abs()[table != 0].min() < 1e-6  # 7 decades of range, as in bitsandbytes


def test_bad_bits_and_block_size_are_named():
    with pytest.raises(ValueError, match=r"must be one of \(4, 8\).*got 3"):
        quantize_model(tiny_model(), 3)
    with pytest.raises(ValueError, match="must be one of"):
        QuantizedLinear(8, 8, bits=16)
    with pytest.raises(ValueError, match="block_size must be a positive even number"):
        QuantizedLinear.from_linear(nn.Linear(8, 8), 4, block_size=63)


def test_nibbles_pack_two_codes_per_byte_first_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_values_on_the_nf4_grid_survive_exactly_and_codes_are_the_nearest_levels():
    levels = torch.tensor(NF4_VALUES)
    weight = (levels[torch.randperm(16 * 8, generator=torch.Generator().manual_seed(1)) % 16] * 0.5).view(4, 32)
    layer = QuantizedLinear.from_linear(nn.Linear(32, 4, bias=False), 4, double_quant=False)
    layer.quantize_(weight)
    assert torch.equal(layer.weight, weight)  # each block of 64 holds -1 and 1, so its absmax is exactly 0.5
    # Off the grid: every value lands on the nearest level of its block (a tie goes to the lower level).
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    layer = QuantizedLinear.from_linear(nn.Linear(64, 3, bias=False), 4, double_quant=False)
    layer.quantize_(x)
    scaled = x / x.abs().amax(1, keepdim=True)
    nearest = levels[(scaled[..., None] - levels).abs().argmin(-1)]
    assert torch.allclose(layer.weight, nearest * x.abs().amax(1, keepdim=True), atol=1e-7)


@pytest.mark.parametrize("shape", [(19, 37), (64, 64), (3, 5), (128, 200)])
@pytest.mark.parametrize("bits,double_quant", KINDS)
def test_round_trip_error_is_bounded_for_any_shape(shape, bits, double_quant):
    """Mean |W - Q(W)| relative to std(W), for Gaussian weights.

    NF4: a block of 64 Gaussian values has absmax about 2.4 std, and the NF4 levels are 0.08 to 0.16 of absmax
    apart in the bulk (0.28 at the edges), so rounding to the nearest costs about a quarter step on average:
    ~0.07 std (measured 0.070-0.073); we allow 0.1. int8 per row: a quarter of absmax/127, with a row's absmax
    about 3-4 std, ~0.007 std; we allow 0.012, and ask it to be at least 8x below NF4's.
    """
    out_features, in_features = shape
    linear = gaussian_linear(in_features, out_features, bias=True)
    layer = QuantizedLinear.from_linear(linear, bits, double_quant=double_quant)
    assert layer.weight.shape == linear.weight.shape and layer.weight.dtype == torch.float32
    error = ((layer.weight - linear.weight).abs().mean() / linear.weight.std()).item()
    if bits == 4:
        assert error < 0.1
        assert (layer.weight - linear.weight).abs().max() <= linear.weight.abs().max() * 0.15
    else:
        assert error < 0.012
        nf4 = QuantizedLinear.from_linear(linear, 4)
        assert error * 8 < ((nf4.weight - linear.weight).abs().mean() / linear.weight.std()).item()
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad


def test_double_quantized_absmax_stays_within_one_percent():
    linear = gaussian_linear(512, 512)
    plain = QuantizedLinear.from_linear(linear, 4, double_quant=False)
    double = QuantizedLinear.from_linear(linear, 4, double_quant=True)
    assert double.qabsmax.dtype == torch.uint8 and double.absmax2.numel() == 512 * 512 // 64 // 256
    assert ((double.block_absmax() - plain.absmax).abs() / plain.absmax).max() < 0.01
    assert torch.equal(unpack_nibbles(double.qweight), unpack_nibbles(plain.qweight))  # same weight codes


@pytest.mark.parametrize("bits,double_quant", KINDS)
def test_quantized_model_logits_stay_close(bits, double_quant):
    model = tiny_model()
    with torch.no_grad():
        reference = model(IDS)
    names = quantize_model(model, bits, double_quant=double_quant)
    assert len(names) == 2 * 7 and "lm_head" not in names and type(model.lm_head) is nn.Linear
    assert all(isinstance(m, QuantizedLinear) for m in quantized_modules(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layers." in n and "proj" in n)
    with torch.no_grad():
        logits = model(IDS)
    cosine = F.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
    assert cosine > (0.999 if bits == 4 else 0.99999)  # measured 0.99906 (NF4) and 0.999999 (int8)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > (0.9 if bits == 4 else 0.99)


def test_forward_matches_a_plain_linear_on_the_dequantized_weight_in_float_and_bfloat16():
    linear = gaussian_linear(37, 19, bias=True)
    layer = QuantizedLinear.from_linear(linear, 4)
    x = torch.randn(2, 5, 37)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer.absmax_offset.dtype == torch.float32 and layer.absmax2.dtype == torch.float32  # scales kept
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.linear(x, layer.dequantize(torch.float32), layer.bias.float()), atol=0.02)


def test_backward_reaches_the_input_and_bias_and_keeps_no_float_weight():
    layer = QuantizedLinear.from_linear(gaussian_linear(37, 19, bias=True), 8)
    layer.to(torch.float64)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: layer(x), (x, layer.bias))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x).sum().backward()
    assert (19, 37) not in saved  # the weight is rebuilt for the backward pass, not held from the forward


def test_qlora_order_quantize_then_lora_trains_only_the_adapters():
    model = tiny_model()
    quantize_model(model, 4)
    assert len(linear_module_names(model)) == 2 * 7 + 1  # apply_lora's search finds the quantized layers
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    assert len(names) == 2 * 7
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, QuantizedLinear) and q_proj.lora_A.weight.dtype == torch.float32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert count_trainable(model)[0] == 2 * sum(4 * (i + o) for i, o in
                                                [(64, 64), (64, 32), (64, 32), (64, 64),
                                                 (64, 128), (64, 128), (128, 64)])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(IDS[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    optimizer.step()
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # the quantized base is untouched
    with torch.no_grad():
        after = model(IDS[:, :-1])
    assert F.cross_entropy(after.reshape(-1, after.shape[-1]), IDS[:, 1:].reshape(-1)) < loss


def test_lora_first_then_quantize_also_works():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    names = quantize_model(model, 8)
    assert "model.layers.0.self_attn.q_proj.base_layer" in names and not any("lora_" in n for n in names)
    assert isinstance(model.model.layers[0].self_attn.q_proj.lora_A, nn.Linear)
    model(IDS).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None


@pytest.mark.parametrize("bits,double_quant", KINDS)
def test_storage_is_an_eighth_or_a_quarter_of_float32(bits, double_quant):
    model = tiny_model()
    float_bytes = linear_weight_bytes(model)
    quantize_model(model, bits, skip=(), double_quant=double_quant)
    ratio = linear_weight_bytes(model) / float_bytes
    # Per weight: NF4 4 bits + a float32 absmax per 64 (0.5 bit) = 4.5/32; with double quantization
    # 4 + 8/64 + 32/(64*256) bits ~ 4.13/32 (here a little more: one second-level block is mostly padding).
    # int8: 8 bits + a float32 per row of 64 or 128 inputs.
    expected = {(4, False): 4.5 / 32, (4, True): 0.129, (8, False): 0.266}[(bits, double_quant)]
    assert ratio == pytest.approx(expected, abs=0.003)
    assert not any(b.is_floating_point() and b.numel() > 1024 for b in model.buffers())


def test_dequantize_model_restores_plain_linears_with_the_same_outputs():
    model = tiny_model()
    names = quantize_model(model, 4)
    with torch.no_grad():
        quantized = model(IDS)
    weights = {n: m.weight for n, m in quantized_modules(model).items()}
    assert dequantize_model(model) == names
    assert not quantized_modules(model)
    for name in names:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and torch.equal(module.weight, weights[name])
        assert not module.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(model(IDS), quantized, atol=1e-5)


def test_export_dequantize_then_merge_lora_is_exact():
    model = tiny_model()
    quantize_model(model, 4)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        trained = model(IDS)
    dequantize_model(model)  # the base_layer of every adapter becomes a float nn.Linear
    merge_lora(model)
    assert not quantized_modules(model) and all(type(m) is nn.Linear for n, m in model.named_modules()
                                                if n.endswith("proj"))
    with torch.no_grad():
        assert torch.allclose(model(IDS), trained, atol=1e-5)


def test_merging_into_a_quantized_base_requantizes_it():
    layer = gaussian_linear(64, 64)
    model = nn.Sequential(layer)
    quantize_model(model, 8)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["0"]))
    with torch.no_grad():
        model[0].lora_B.weight.normal_(0, 0.01)
        expected = model[0].base_layer.weight + model[0].delta_weight()
    merge_lora(model)  # LoRALinear.merge does base.weight += delta: the setter stores the sum quantized
    assert isinstance(model[0], QuantizedLinear)
    assert (model[0].weight - expected).abs().max() <= expected.abs().amax(1).max() / 127


def test_state_dict_round_trip_and_meta_models():
    source = QuantizedLinear.from_linear(gaussian_linear(37, 19, bias=True), 4)
    assert set(source.state_dict()) == {"qweight", "qabsmax", "absmax2", "absmax_offset", "bias"}
    target = QuantizedLinear(37, 19, bias=True, bits=4)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)
    # A meta-device 7B model quantizes (shapes only) and LoRA counts what the LoRA article counts.
    model = build_meta_model(get_preset("llama-2-7b"))
    float_bytes = linear_weight_bytes(model)
    quantize_model(model, 4)
    assert linear_weight_bytes(model) / float_bytes < 0.15  # measured 24.6 GiB -> 3.6 GiB (head in float32)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]))
    assert count_trainable(model)[0] == 4_194_304


def test_skip_names_and_already_quantized_layers():
    model = tiny_model()
    names = quantize_model(model, 4, skip=("lm_head", "down_proj"))
    assert len(names) == 2 * 6 and not any(n.endswith("down_proj") for n in names)
    assert quantize_model(model, 8, skip=("lm_head", "down_proj")) == []  # quantized layers are left alone
    copy.deepcopy(model)(IDS)  # deep copies work (e.g. for an EMA or a reference model)


def test_qlora_trains_under_bfloat16_autocast_as_the_training_loop_runs_it():
    model = tiny_model()
    quantize_model(model, 4)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IDS)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), IDS.reshape(-1))
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # lora_A's is 0 while B = 0
