"""Weight-decay groups as transformers/nanoGPT: matrices decay; norms, biases and embeddings do not."""
import pytest
import torch

from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.training.optim import build_optimizer, decay_groups


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_decay_groups_split_matrices_from_norms_biases_and_embeddings():
    model = Transformer(get_preset("tiny-qwen2"))  # qkv biases, tied embeddings
    decay, keep = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    decayed, kept = names_of(model, decay), names_of(model, keep)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.layers.1.mlp.down_proj.weight" in decayed
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.input_layernorm.weight"} <= kept
    assert not decayed & kept and len(decayed | kept) == len(list(model.parameters()))


def test_only_trainable_parameters_are_optimised_and_decay_is_applied():
    model = Transformer(get_preset("tiny-llama"))
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    optimizer = build_optimizer(model, "adamw_torch", 1e-2, weight_decay=0.5)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2
    before_head, before_norm = model.lm_head.weight.detach().clone(), model.model.norm.weight.detach().clone()
    for p in (model.lm_head.weight, model.model.norm.weight):
        p.grad = torch.zeros_like(p)  # no gradient: only decay can move a weight
    optimizer.step()
    assert torch.allclose(model.lm_head.weight, before_head * (1 - 1e-2 * 0.5))
    assert torch.equal(model.model.norm.weight, before_norm)


def test_nothing_trainable_is_refused():
    model = Transformer(get_preset("tiny-llama")).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(model, "sgd", 1e-2)
