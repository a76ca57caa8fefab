import math

import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.evaluation.perplexity import perplexity
from tests.conftest import make_hf_model, save_hf_model


def reference_nll(hf_model, ids, ctx):
    """transformers' loss over the same non-overlapping windows, token-weighted."""
    total, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        window = torch.tensor([ids[start:start + ctx]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = hf_model(window, labels=window).loss.item()
        total += loss * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return total / count


def test_tiny_perplexity_matches_transformers(tmp_path):
    hf = make_hf_model("qwen2")
    ours = load_pretrained(save_hf_model(hf, tmp_path), dtype="float32").model
    ids = torch.randint(3, 256, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(ours, ids, ctx=32)
    assert result.windows == 4 and result.tokens == 31 * 3 + 3
    assert abs(result.nll - reference_nll(hf, ids, 32)) <= 1e-4
    assert math.isclose(result.perplexity, math.exp(result.nll))


def test_bad_windows(tmp_path):
    ours = load_pretrained(save_hf_model(make_hf_model("llama"), tmp_path), dtype="float32").model
    with pytest.raises(ValueError, match="ctx must be at least 2"):
        perplexity(ours, [1, 2, 3], ctx=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(ours, [1, 2, 3], ctx=10_000)
    with pytest.raises(ValueError, match="needs at least 2"):
        perplexity(ours, [1], ctx=8)


@pytest.mark.real
def test_real_perplexity_matches_transformers(real_lm, hf_real):
    text = ("The furnace of alchemy, dan lu, refines cinnabar into elixirs. " * 20 +
            "语言模型在炼丹炉中被精炼。" * 10)
    ids = real_lm.tokenizer(text)["input_ids"]
    result = perplexity(real_lm.model, ids, ctx=128)
    assert abs(result.nll - reference_nll(hf_real, ids, 128)) <= 1e-3
