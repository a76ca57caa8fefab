"""Intermediates: hidden states and pre-softmax attention scores, recorded without changing the output."""
import pytest
import torch

from danlu.models.presets import get_preset
from danlu.models.transformer import Intermediates, Transformer


def random_model(preset: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset(preset)).eval()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-mistral"])
def test_the_explicit_attention_path_gives_sdpas_logits(preset):
    model = random_model(preset)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    for attention_mask in (None, mask):
        fast = model(ids, attention_mask=attention_mask)
        seen = Intermediates(attention_scores=True)
        explicit = model(ids, attention_mask=attention_mask, intermediates=seen)
        torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)


def test_packed_rows_give_the_same_logits_on_the_explicit_path():
    model = random_model("tiny-llama")
    ids = torch.randint(0, 256, (1, 10))
    documents = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0]])
    fast = model(ids, document_ids=documents)
    explicit = model(ids, document_ids=documents, intermediates=Intermediates(attention_scores=True))
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)


def test_hidden_states_are_the_embedding_then_each_block_output():
    model = random_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 7))
    seen = Intermediates()
    logits = model(ids, intermediates=seen)
    assert len(seen.hidden_states) == model.config.num_hidden_layers + 1 and seen.scores == []
    torch.testing.assert_close(seen.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(model.model.norm(seen.hidden_states[-1])), logits)


def test_attention_scores_are_scaled_dot_products_before_the_mask():
    model = random_model("tiny-llama")  # 4 query heads over 2 key/value heads
    ids = torch.randint(0, 256, (1, 5))
    seen = Intermediates(attention_scores=True)
    model(ids, intermediates=seen)
    config = model.config
    assert len(seen.scores) == config.num_hidden_layers
    assert seen.scores[0].shape == (1, config.num_attention_heads, 5, 5)
    # above the diagonal (future keys) the raw score is kept, not -inf: the loss decides what counts
    assert torch.isfinite(seen.scores[0]).all()
    from danlu.models.rope import apply_rope, rope_cos_sin
    from danlu.models.transformer import split_heads

    attention = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(seen.hidden_states[0])
    cos, sin = rope_cos_sin(model.rope_inverse_frequencies(x.device), torch.arange(5)[None], x.dtype)
    q = apply_rope(split_heads(attention.q_proj(x), config.head_dim), cos, sin)
    k = apply_rope(split_heads(attention.k_proj(x), config.head_dim), cos, sin)
    k = k.repeat_interleave(2, dim=1)
    torch.testing.assert_close(seen.scores[0], q @ k.transpose(-1, -2) / config.head_dim ** 0.5)


def test_gradients_flow_through_the_recorded_states():
    model = random_model("tiny-llama")
    seen = Intermediates(attention_scores=True)
    model(torch.randint(0, 256, (1, 6)), intermediates=seen)
    (seen.hidden_states[1].pow(2).mean() + seen.scores[1].pow(2).mean()).backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
