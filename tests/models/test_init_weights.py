"""Transformer.init_weights: Hugging Face's initialisation, also after building on the meta device."""
import pytest
import torch

from danlu.models.config import ModelConfig
from danlu.models.transformer import build_meta_model


@pytest.mark.parametrize("norm,std", [("rmsnorm", 0.02), ("layernorm", 0.006)])
def test_init_weights_statistics(norm, std):
    config = ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=1024, norm=norm, qkv_bias=True, o_bias=True, mlp_bias=True,
                         qk_norm=True, tie_word_embeddings=True, initializer_range=std)
    model = build_meta_model(config).to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        if p.dim() == 2:  # linear and embedding weights
            assert abs(p.std().item() - std) <= 0.03 * std, name
            assert abs(p.mean().item()) <= 0.03 * std, name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert torch.all(p == 1), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_weights_draws_from_the_torch_seed():
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)
    models = [build_meta_model(config).to_empty(device="cpu") for _ in range(2)]
    for model in models:
        torch.manual_seed(7)
        model.init_weights()
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
