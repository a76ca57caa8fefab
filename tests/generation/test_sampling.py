"""Sampling processors against transformers' own, and the validation of settings."""
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from danlu.generation.sampling import (GenerationConfig, apply_repetition_penalty, draw, filter_top_k,
                                       filter_top_k_top_p, filter_top_p, next_tokens)

LOGITS = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3


def test_top_k_matches_transformers():
    assert torch.equal(filter_top_k(LOGITS, 7), TopKLogitsWarper(7)(None, LOGITS.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    assert torch.equal(filter_top_p(LOGITS, p), TopPLogitsWarper(p)(None, LOGITS.clone()))


@pytest.mark.parametrize("k, p", [(1, 0.9), (7, 0.5), (50, 0.9), (1000, 0.95), (40, 1e-6)])
def test_top_k_then_top_p_on_the_survivors_matches_transformers_warpers_in_turn(k, p):
    logits = torch.randn(8, 4096, generator=torch.Generator().manual_seed(k)) * 3
    expected = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, logits.clone()))
    assert torch.equal(filter_top_k_top_p(logits, k, p), expected)


def test_a_tie_at_the_kth_value_keeps_every_tied_token_as_transformers_does():
    logits = torch.tensor([[4.0, 3.0, 2.0, 2.0, 2.0, 1.0], [5.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    expected = TopPLogitsWarper(0.99)(None, TopKLogitsWarper(3)(None, logits.clone()))
    assert torch.isfinite(expected[0]).sum() == 5
    assert torch.equal(filter_top_k_top_p(logits, 3, 0.99), expected)


def test_the_inverse_cdf_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    tokens = draw(probs.expand(40_000, -1), generator)
    frequencies = torch.bincount(tokens, minlength=6) / 40_000
    assert frequencies[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)  # 3 standard errors ~0.0075
    unnormalised = torch.tensor([[0.0, 2.0, 0.0], [1e-30, 0.0, 0.0]])  # a sum that is not 1; a lone tiny entry
    assert draw(unnormalised, generator).tolist() == [1, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_from_nan_or_inf_logits_is_refused_not_answered_with_a_token(bad):
    logits = LOGITS.clone()
    logits[1, 3] = bad
    config = GenerationConfig(temperature=0.7, top_k=0, top_p=1.0)
    with pytest.raises(ValueError, match="next-token probabilities are not finite"):
        next_tokens(logits, config, None, torch.Generator().manual_seed(0))


def test_repetition_penalty_matches_transformers():
    history = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 4], [49, 48, 1, 1]])
    seen = torch.zeros_like(LOGITS, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, LOGITS.clone())
    assert torch.allclose(apply_repetition_penalty(LOGITS, seen, 1.3), expected)


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    assert torch.equal(next_tokens(LOGITS, GenerationConfig(temperature=0), None, None), LOGITS.argmax(-1))
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0)
    draw = lambda seed: next_tokens(LOGITS, config, None, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert any(not torch.equal(draw(3), draw(s)) for s in range(4, 10))


def test_top_k_one_is_greedy_even_when_sampling():
    config = GenerationConfig(temperature=1.5, top_k=1, top_p=1.0)
    assert torch.equal(next_tokens(LOGITS, config, None, torch.Generator().manual_seed(0)), LOGITS.argmax(-1))


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -2), ("repetition_penalty", 0),
                                         ("stop", "###"), ("seed", "x")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"generation setting {field} must be"):
        GenerationConfig(**{field: value})


def test_updated_rejects_unknown_setting():
    with pytest.raises(ValueError, match="unknown generation setting.*'nosuch'"):
        GenerationConfig().updated(nosuch=1)


def test_with_stops_adds_template_markers_once():
    config = GenerationConfig(stop=["###"])
    assert config.with_stops(["<|im_end|>", "###", "<|im_end|>"]).stop == ["###", "<|im_end|>"]
    assert config.with_stops([]) is config
