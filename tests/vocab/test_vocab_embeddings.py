"""Growing the embedding and lm_head: new rows are means of old rows, old rows untouched."""
import pytest
import torch

from danlu.models.config import ModelConfig
from danlu.vocab.embeddings import grow_vocabulary, grown_rows, padded_size


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, **changes)


def test_new_rows_are_means_and_padding_the_mean_of_all():
    weight = torch.randn(10, 8)
    grown = grown_rows(weight, {10: [1, 2], 11: [3, 3, 4], 5: [7, 8]}, rows=16)
    assert grown.shape == (16, 8)
    assert torch.equal(grown[10], weight[[1, 2]].mean(0)) and torch.equal(grown[11], weight[[3, 3, 4]].mean(0))
    assert torch.equal(grown[5], weight[[7, 8]].mean(0))  # an old unused row given to a new token
    assert torch.equal(grown[:5], weight[:5]) and torch.equal(grown[6:10], weight[6:10])
    assert all(torch.equal(grown[i], weight.mean(0)) for i in range(12, 16))


def test_untied_head_grows_from_its_own_rows():
    config = tiny_config()
    state = {"model.embed_tokens.weight": torch.randn(10, 8), "lm_head.weight": torch.randn(10, 8)}
    grown, new_config = grow_vocabulary(state, config, {10: [0, 1], 11: [2]}, pad_to_multiple_of=4)
    assert new_config.vocab_size == 12 and grown["lm_head.weight"].shape == (12, 8)
    assert torch.equal(grown["lm_head.weight"][10], state["lm_head.weight"][[0, 1]].mean(0))
    assert torch.equal(grown["model.embed_tokens.weight"][10], state["model.embed_tokens.weight"][[0, 1]].mean(0))


def test_tied_head_stays_the_embedding():
    embedding = torch.randn(10, 8)
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}
    grown, config = grow_vocabulary(state, tiny_config(tie_word_embeddings=True), {10: [4, 5]}, pad_to_multiple_of=8)
    assert config.vocab_size == 16 and grown["lm_head.weight"] is grown["model.embed_tokens.weight"]


def test_bfloat16_rows_are_averaged_in_float32():
    weight = torch.randn(10, 8).bfloat16()
    grown = grown_rows(weight, {10: [1, 2, 3]}, rows=11)
    assert grown.dtype == torch.bfloat16
    assert torch.equal(grown[10], weight[[1, 2, 3]].float().mean(0).bfloat16())


@pytest.mark.parametrize("multiple", [0, -64])
def test_bad_padding_multiple(multiple):
    with pytest.raises(ValueError, match="--pad-to-multiple-of must be a positive integer"):
        padded_size(100, multiple)


def test_sources_must_be_old_rows():
    with pytest.raises(ValueError, match="not rows of the old embedding"):
        grown_rows(torch.randn(4, 2), {4: [5]}, rows=5)
