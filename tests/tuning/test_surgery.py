"""Module surgery: replacing a submodule by name, and the base linears seen through wrappers."""
import pytest
import torch
from torch import nn

from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.tuning.lora import LoRAConfig, LoRALinear, apply_lora
from danlu.tuning.quantized import QuantizedLinear, quantize_model
from danlu.tuning.surgery import LinearWrapper, base_linears, plain_name, replace_module

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny-llama")).eval()


def test_replace_module_top_level_and_nested_returns_the_old_one():
    model = tiny_model()
    head, new_head = model.lm_head, nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    assert replace_module(model, "lm_head", new_head) is head and model.lm_head is new_head
    up = model.model.layers[1].mlp.up_proj
    new_up = nn.Identity()
    assert replace_module(model, "model.layers.1.mlp.up_proj", new_up) is up
    assert model.get_submodule("model.layers.1.mlp.up_proj") is new_up
    assert model.model.layers[0].mlp.up_proj is not new_up  # only that one


def test_replace_module_bad_names_are_errors_naming_what_exists():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"no submodule 'model.layers.0.mlp.upp_proj'.*'up_proj'"):
        replace_module(model, "model.layers.0.mlp.upp_proj", nn.Identity())
    with pytest.raises(ValueError, match="no submodule 'model.nothing'"):
        replace_module(model, "model.nothing.q_proj", nn.Identity())
    with pytest.raises(ValueError, match="no submodule 'lm_heads'"):
        replace_module(model, "lm_heads", nn.Identity())
    with pytest.raises(ValueError, match="the model itself"):
        replace_module(model, "", nn.Identity())
    with pytest.raises(ValueError, match="no submodule 'model.norm.weight'"):  # a parameter is not a module
        replace_module(model, "model.norm.weight", nn.Identity())


def test_base_linears_of_a_plain_model():
    model = tiny_model()
    linears = base_linears(model)
    names = [linear.name for linear in linears]
    assert names == [f"model.layers.{i}.{part}.{p}" for i in range(2) for part, projections in
                     [("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])] for p in projections] + ["lm_head"]
    assert all(linear.path == linear.name and linear.module is model.get_submodule(linear.name) for linear in linears)


def test_base_linears_look_through_lora_and_quantized_layers_never_at_adapters():
    model = tiny_model()
    plain = [linear.name for linear in base_linears(model)]
    quantize_model(model, 8)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj", "down_proj"]))
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj"]))  # stacked: two wrappers around q_proj
    linears = {linear.name: linear for linear in base_linears(model)}
    assert list(linears) == plain
    q = linears["model.layers.0.self_attn.q_proj"]
    assert q.path == "model.layers.0.self_attn.q_proj.base_layer.base_layer"
    assert isinstance(q.module, QuantizedLinear) and model.get_submodule(q.path) is q.module
    assert isinstance(model.get_submodule(q.name), LoRALinear)
    assert linears["model.layers.1.mlp.down_proj"].path == "model.layers.1.mlp.down_proj.base_layer"
    assert type(linears["lm_head"].module) is nn.Linear  # skipped by quantize_model, still a base linear
    assert not any("lora" in linear.path for linear in linears.values())
    assert plain_name(q.path) == q.name and plain_name("a.base_layer.base_layer.weight") == "a.weight"


def test_a_wrapper_reads_as_the_linear_it_wraps():
    base = nn.Linear(5, 3)
    outer = LinearWrapper(LinearWrapper(base))
    assert (outer.in_features, outer.out_features) == (5, 3) and outer.weight is base.weight
    new = nn.Parameter(torch.zeros(3, 5))
    outer.weight = new
    assert base.weight is new
    assert [(linear.name, linear.path) for linear in base_linears(nn.Sequential(outer))] == \
        [("0", "0.base_layer.base_layer")]
