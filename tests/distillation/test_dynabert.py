"""DynaBERT: importance, rewiring, width/depth sub-networks sharing the model's weights, extraction and export."""
import copy
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import save_hf_checkpoint
from danlu.distillation.dynabert import (DEPTHS, WIDTHS, Importance, extract, grid, importance, kept_layers,
                                         kept_units, rewire, sub_config, sub_network)
from danlu.models.presets import get_preset
from danlu.models.transformer import Intermediates, Transformer

SIZES = dict(num_hidden_layers=4, num_attention_heads=8, head_dim=8, intermediate_size=128)
CONFIGS = {
    "llama-gqa": get_preset("tiny-llama").replace(**SIZES, num_key_value_heads=4),
    "llama-mha-biases": get_preset("tiny-llama").replace(**SIZES, num_key_value_heads=8, qkv_bias=True,
                                                         o_bias=True, mlp_bias=True),
    "qwen2-gqa-tied": get_preset("tiny-qwen2").replace(**SIZES, num_key_value_heads=2),
    "qwen3-qk-norm": get_preset("tiny-qwen3").replace(**{**SIZES, "head_dim": 16}, num_key_value_heads=4),
    # plain (ungated) MLP, LayerNorm, biases everywhere: the shape of an encoder's block
    "gelu-layernorm-biases": get_preset("tiny-llama").replace(**SIZES, num_key_value_heads=8, architecture="custom",
                                                              norm="layernorm", mlp="gelu", qkv_bias=True,
                                                              o_bias=True, mlp_bias=True),
}
EXPORTABLE = ["llama-gqa", "llama-mha-biases", "qwen2-gqa-tied", "qwen3-qk-norm"]


def random_model(name: str, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]).to(dtype).eval()
    with torch.no_grad():  # norms away from one and biases away from zero, so that a misplaced one shows
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name or parameter_name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def token_batches(count: int = 2, seq: int = 12):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, seq), generator=generator) for _ in range(count)]


def next_token_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


# ---------------------------------------------------------------- sizes

def test_kept_layers_of_twelve_follow_dynaberts_rule():
    assert kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert kept_layers(12, 0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert kept_layers(12, 1.0) == list(range(12))
    for depth in (0.5, 0.75):  # the paper's "drop d when (d + 1) mod (1 / m_d) == 0", in exact arithmetic
        dropped = [d for d in range(12) if (d + 1) % (1 / Fraction(str(depth))) == 0]
        assert sorted(set(range(12)) - set(kept_layers(12, depth))) == dropped
    assert kept_layers(4, 0.5) == [0, 2] and kept_layers(4, 0.75) == [0, 1, 2]


def test_widths_keep_whole_key_value_groups_rounded_half_up():
    config = CONFIGS["llama-gqa"]  # 8 query heads in 4 groups, 128 neurons
    assert [kept_units(config, w) for w in WIDTHS] == [(4, 128), (3, 96), (2, 64), (1, 32)]
    two_groups = CONFIGS["qwen2-gqa-tied"]
    assert kept_units(two_groups, 0.25) == (1, 32)  # 0.5 of a group rounds up to one
    assert kept_units(two_groups, 0.75) == (2, 96)  # 1.5 groups round up to both
    small = sub_config(config, 0.75, 0.5)
    assert (small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads,
            small.intermediate_size, small.head_dim) == (2, 6, 3, 96, 8)
    assert kept_units(config.replace(intermediate_size=1), 0.25)[1] == 1  # at least one neuron


def test_grid_lists_every_width_at_every_depth():
    pairs = grid()
    assert len(pairs) == len(WIDTHS) * len(DEPTHS) == 12
    assert pairs[:4] == [(1.0, 1.0), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0)] and pairs[-1] == (0.25, 0.5)


@pytest.mark.parametrize("width, depth, message", [
    (0.0, 1.0, r"width must be a number in \(0, 1\] \(DynaBERT's widths: \[1.0, 0.75, 0.5, 0.25\]\), got 0.0"),
    (1.5, 1.0, r"width must be a number in \(0, 1\].*got 1.5"),
    ("half", 1.0, r"width must be a number in \(0, 1\].*got 'half'"),
    (1.0, 0.0, r"depth must be a number in \(0, 1\] \(DynaBERT's depths: \[1.0, 0.75, 0.5\]\), got 0.0"),
    (1.0, -0.5, r"depth must be a number in \(0, 1\].*got -0.5"),
    (0.1, 1.0, r"width 0.1 keeps none of the 4 key/value groups.*width must be in \[0.125, 1\]"),
    (1.0, 0.1, r"depth 0.1 keeps none of the 4 layers; depth must be in \[0.125, 1\]"),
])
def test_bad_sizes_are_refused_naming_the_argument(width, depth, message):
    model = random_model("llama-gqa")
    with pytest.raises(ValueError, match=message):
        sub_network(model, width, depth)
    with pytest.raises(ValueError, match=message):
        extract(model, width, depth)


# ---------------------------------------------------------------- importance and rewiring

def derivative(model, batch, scale_rows=None, scale_columns=None) -> float:
    """d loss / d alpha at alpha = 1 with some rows (and their biases) or columns of linears scaled by alpha: the
    first-order Taylor term sum(w * dL/dw) over those weights, by autograd through scaled copies of them."""
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)
    scaled = {}
    for names, dim in ((scale_rows or {}, 0), (scale_columns or {}, 1)):
        for name, index in names.items():
            module = model.get_submodule(name)
            for kind in ("weight", "bias") if dim == 0 else ("weight",):
                tensor = getattr(module, kind)
                if tensor is None:
                    continue
                chosen = torch.zeros(tensor.shape[dim], dtype=torch.bool)
                chosen[index] = True
                factor = torch.where(chosen, alpha, torch.ones((), dtype=torch.float64)).to(tensor.dtype)
                scaled[f"{name}.{kind}"] = tensor * (factor[:, None] if tensor.dim() == 2 and dim == 0 else factor)
    loss = next_token_loss(lambda ids: torch.func.functional_call(model, scaled, (ids,)), batch)
    return torch.autograd.grad(loss, alpha)[0].item()


@pytest.mark.parametrize("name", ["llama-gqa", "gelu-layernorm-biases"])
def test_importance_is_the_first_order_loss_change(name):
    model = random_model(name, torch.float64)
    config, batches = model.config, token_batches()
    found = importance(model, batches, next_token_loss)
    group_size, head_dim = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    assert found.heads.shape == (4, config.num_key_value_heads) and found.neurons.shape == (4, 128)
    for layer in (0, 3):
        attention = f"model.layers.{layer}.self_attn"
        for group in range(config.num_key_value_heads):
            expected = 0.0
            for head in range(group * group_size, (group + 1) * group_size):
                columns = {f"{attention}.o_proj": slice(head * head_dim, (head + 1) * head_dim)}
                expected += sum(abs(derivative(model, batch, scale_columns=columns)) for batch in batches)
            assert found.heads[layer, group].item() == pytest.approx(expected, rel=1e-4, abs=1e-8)
        mlp = f"model.layers.{layer}.mlp"
        feeding = ["gate_proj", "up_proj"] if config.mlp == "swiglu" else ["up_proj"]
        for neuron in (0, 77):
            expected = sum(
                abs(derivative(model, batch, scale_rows={f"{mlp}.{p}": neuron for p in feeding}))
                + abs(derivative(model, batch, scale_columns={f"{mlp}.down_proj": neuron}))
                for batch in batches)
            assert found.neurons[layer, neuron].item() == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_importance_leaves_a_frozen_model_as_it_was():
    model = random_model("llama-gqa").requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    importance(model, token_batches(1), next_token_loss)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rewiring_keeps_the_logits_and_sorts_the_importance(name):
    model = random_model(name)
    ids = token_batches(1)[0]
    found = importance(model, token_batches(), next_token_loss)
    with torch.no_grad():
        before = model(ids)
    rewire(model, found)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
    again = importance(model, token_batches(), next_token_loss)
    torch.testing.assert_close(again.heads, found.heads.sort(dim=1, descending=True).values, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(again.neurons, found.neurons.sort(dim=1, descending=True).values,
                               rtol=1e-4, atol=1e-7)


def test_rewiring_moves_whole_key_value_groups():
    model = random_model("qwen2-gqa-tied")  # 2 groups of 4 query heads, biases on q/k/v
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, q_bias, k, o = (t.clone() for t in (attention.q_proj.weight, attention.q_proj.bias, attention.k_proj.weight,
                                           attention.o_proj.weight))
    up, down = mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
    neurons = torch.zeros(4, 128)
    neurons[1, 5] = 1.0
    rewire(model, Importance(heads=torch.tensor([[1.0, 2.0]] * 4), neurons=neurons))
    group = 4 * 8  # q rows and o columns of one group: 4 heads of 8
    assert torch.equal(attention.q_proj.weight, torch.cat([q[group:], q[:group]]))
    assert torch.equal(attention.q_proj.bias, torch.cat([q_bias[group:], q_bias[:group]]))
    assert torch.equal(attention.k_proj.weight, torch.cat([k[8:], k[:8]]))
    assert torch.equal(attention.o_proj.weight, torch.cat([o[:, group:], o[:, :group]], dim=1))
    assert torch.equal(mlp.up_proj.weight[0], up[5]) and torch.equal(mlp.down_proj.weight[:, 0], down[:, 5])
    assert torch.equal(mlp.up_proj.weight[1:6], up[:5])  # the ties keep their order (stable sort)


def test_rewiring_refuses_importance_of_another_shape():
    model = random_model("llama-gqa")
    with pytest.raises(ValueError, match=r"importance.heads has shape \(4, 8\); this model needs \(4, 4\)"):
        rewire(model, Importance(heads=torch.zeros(4, 8), neurons=torch.zeros(4, 128)))


# ---------------------------------------------------------------- sub-networks

@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_width_and_depth_is_the_model_itself(name):
    model = random_model(name)
    ids = token_batches(1)[0]
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(sub_network(model, 1.0, 1.0)(ids), expected, atol=0, rtol=0)
        torch.testing.assert_close(extract(model, 1.0, 1.0)(ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
def test_a_width_is_the_model_without_its_rightmost_heads_and_neurons(name, width):
    model = random_model(name)
    groups, neurons = kept_units(model.config, width)
    config = model.config
    kept_columns = groups * (config.num_attention_heads // config.num_key_value_heads) * config.head_dim
    silenced = copy.deepcopy(model)
    with torch.no_grad():  # what a dropped head or neuron adds is zero once its o / down columns are zero
        for layer in silenced.model.layers:
            layer.self_attn.o_proj.weight[:, kept_columns:] = 0
            layer.mlp.down_proj.weight[:, neurons:] = 0
        ids = token_batches(1)[0]
        torch.testing.assert_close(sub_network(model, width, 1.0)(ids), silenced(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [0.75, 0.5])
def test_a_depth_runs_only_the_kept_layers(depth):
    model = random_model("llama-gqa")
    shallow = copy.deepcopy(model)
    for layer in set(range(4)) - set(kept_layers(4, depth)):
        del shallow.model.layers._modules[str(layer)]
    ids = token_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(sub_network(model, 1.0, depth)(ids), shallow(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("width, depth", [(0.5, 0.5), (0.25, 0.75), (0.75, 1.0)])
def test_the_extracted_model_computes_the_sub_network(name, width, depth):
    model = random_model(name)
    sub, small = sub_network(model, width, depth), extract(model, width, depth)
    assert small.config == sub.config and len(small.model.layers) == len(sub.layers)
    assert [block.layer_idx for block in small.model.layers] == list(range(len(sub.layers)))
    ids = token_batches(1)[0]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the keyword arguments go through
    seen_sub, seen_small = Intermediates(attention_scores=True), Intermediates(attention_scores=True)
    with torch.no_grad():
        torch.testing.assert_close(sub(ids, attention_mask=mask, intermediates=seen_sub),
                                   small(ids, attention_mask=mask, intermediates=seen_small), atol=1e-6, rtol=1e-6)
    assert len(seen_sub.hidden_states) == len(sub.layers) + 1
    assert seen_sub.scores[0].shape[1] == sub.config.num_attention_heads
    for ours, theirs in zip(seen_sub.hidden_states + seen_sub.scores, seen_small.hidden_states + seen_small.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def kept_slice(name: str, model, width: float, depth: float):
    """The index of the kept part of a full-model parameter, or None when its whole layer is dropped."""
    config = model.config
    if not name.startswith("model.layers."):
        return (slice(None),)
    layer = int(name.split(".")[2])
    if layer not in kept_layers(config.num_hidden_layers, depth):
        return None
    groups, neurons = kept_units(config, width)
    heads = groups * config.num_attention_heads // config.num_key_value_heads
    rows = {"q_proj": heads * config.head_dim, "k_proj": groups * config.head_dim, "v_proj": groups * config.head_dim,
            "gate_proj": neurons, "up_proj": neurons}
    columns = {"o_proj": heads * config.head_dim, "down_proj": neurons}
    module, kind = name.split(".")[-2:]
    if module in rows:
        return (slice(0, rows[module]),)
    if module in columns and kind == "weight":
        return (slice(None), slice(0, columns[module]))
    return (slice(None),)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-tied", "gelu-layernorm-biases"])
def test_a_sub_networks_loss_trains_only_the_kept_slices_of_the_shared_weights(name):
    model = random_model(name)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    small = extract(model, 0.5, 0.5)
    batch = token_batches(1)[0]
    next_token_loss(sub_network(model, 0.5, 0.5), batch).backward()
    next_token_loss(small, batch).backward()
    small_grads = {n: p.grad for n, p in small.named_parameters()}
    kept = kept_layers(4, 0.5)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.shape == shapes[parameter_name]
        index = kept_slice(parameter_name, model, 0.5, 0.5)
        if index is None:
            assert parameter.grad is None  # a dropped layer is not in the graph at all
            continue
        grad = parameter.grad
        outside = torch.ones_like(grad, dtype=torch.bool)
        outside[index] = False
        assert torch.count_nonzero(grad[outside]) == 0, parameter_name
        small_name = parameter_name
        if parameter_name.startswith("model.layers."):
            layer = int(parameter_name.split(".")[2])
            small_name = parameter_name.replace(f"model.layers.{layer}.", f"model.layers.{kept.index(layer)}.", 1)
        torch.testing.assert_close(grad[index], small_grads[small_name], atol=1e-6, rtol=1e-5)


def test_a_step_on_the_sub_network_is_seen_by_the_next_call():
    model = random_model("llama-gqa").train()
    sub = sub_network(model, 0.5, 0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = token_batches(1)[0]
    before = next_token_loss(sub, batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = next_token_loss(sub, batch)
        assert after < before
        torch.testing.assert_close(sub(batch), extract(model, 0.5, 0.75)(batch), atol=1e-6, rtol=1e-6)


def test_an_encoder_is_rewired_and_cut_by_the_same_names():
    from danlu.models.presets import PRESETS

    if "tiny-bert" not in PRESETS:
        pytest.skip("danlu.models has no encoder (BERT) mode yet")
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-bert"].replace(num_hidden_layers=4, num_attention_heads=8)).eval()
    ids, types = token_batches(1)[0], torch.randint(0, 2, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as BERT's tokenizers pad
    inputs = dict(token_type_ids=types, attention_mask=mask)
    with torch.no_grad():
        before = model(ids, **inputs)
    rewire(model, importance(model, [ids], lambda m, batch: m(batch, **inputs).pow(2).mean()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, **inputs), before, atol=1e-5, rtol=1e-5)
        for width, depth in [(0.5, 0.5), (0.25, 0.75)]:
            torch.testing.assert_close(sub_network(model, width, depth)(ids, **inputs),
                                       extract(model, width, depth)(ids, **inputs), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- export

def hf_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("name", EXPORTABLE)
def test_an_extracted_sub_network_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = random_model(name)
    rewire(model, importance(model, token_batches(1), next_token_loss))
    small = extract(model, 0.5, 0.5)
    save_hf_checkpoint(small.state_dict(), small.config, tmp_path / "small", torch.float32)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ours = sub_network(model, 0.5, 0.5)(ids)
    assert (hf_logits(tmp_path / "small", ids) - ours).abs().max().item() <= 1e-4


def test_three_heads_that_do_not_divide_the_hidden_size_export_with_their_head_dim(tmp_path):
    model = Transformer(get_preset("tiny-qwen2").replace(num_attention_heads=12, num_key_value_heads=12,
                                                         head_dim=8)).eval()
    small = extract(model, 0.25, 1.0)
    assert (small.config.num_attention_heads, small.config.hidden_size, small.config.head_dim) == (3, 64, 8)
    save_hf_checkpoint(small.state_dict(), small.config, tmp_path / "small", torch.float32)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ours = small(ids)
    assert (hf_logits(tmp_path / "small", ids) - ours).abs().max().item() <= 1e-4


def test_a_llama_whose_fewer_heads_do_not_divide_the_hidden_size_exports_as_mistral(tmp_path):
    model = random_model("llama-gqa")  # 3 of 4 groups: 6 heads at hidden 64, which LlamaConfig refuses
    small = extract(model, 0.75, 1.0)
    assert (small.config.architecture, small.config.num_attention_heads, small.config.hidden_size) == \
        ("mistral", 6, 64)
    save_hf_checkpoint(small.state_dict(), small.config, tmp_path / "small", torch.float32)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ours = sub_network(model, 0.75, 1.0)(ids)
    assert (hf_logits(tmp_path / "small", ids) - ours).abs().max().item() <= 1e-4


def test_a_biased_llama_that_transformers_cannot_hold_is_refused_naming_the_heads(tmp_path):
    small = extract(random_model("llama-mha-biases"), 0.75, 1.0)  # Mistral has no biases: stays Llama
    assert small.config.architecture == "llama"
    with pytest.raises(CheckpointError, match="hidden_size 64 with 6 attention heads"):
        save_hf_checkpoint(small.state_dict(), small.config, tmp_path / "small", torch.float32)
    assert not (tmp_path / "small").exists()
