"""danlu's logits equal transformers' on tiny random models of every family and switch."""
import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.generation.kv_cache import KVCache
from tests.conftest import make_hf_model, save_hf_model

CASES = {
    "llama": ("llama", {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-mha-head-dim": ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "max_position_embeddings": 256,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama3.2-rope-tied": ("llama", {"rope_theta": 500000.0, "head_dim": 32, "tie_word_embeddings": True,
                                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3-tied-head-dim": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1_000_000.0}),
    "qwen3-untied-bias": ("qwen3", {"head_dim": 8, "attention_bias": True, "tie_word_embeddings": False}),
    "qwen3-sliding": ("qwen3", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}),
    "mistral-sliding-mqa": ("mistral", {"sliding_window": 5, "num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=CASES, ids=list(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    hf = make_hf_model(family, **overrides)
    directory = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_pretrained(directory, dtype="float32", device="cpu").model


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= 1e-4


def test_kv_cache_decoding_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(ours.config, 1, 32, torch.float32, "cpu")
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :12], kv_cache=cache)]
        for t in range(12, 20):
            steps.append(ours(ids[:, t:t + 1], kv_cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_packed_documents_do_not_see_each_other(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(3, 256, (n,), generator=g) for n in (7, 5, 9)]
    packed = torch.cat(docs + [torch.zeros(3, dtype=torch.long)])[None]
    document_ids = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)] + [torch.zeros(3)]).long()[None]
    with torch.no_grad():
        together = ours(packed, document_ids=document_ids)
        start = 0
        for d in docs:
            alone = ours(d[None])
            assert (together[:, start:start + len(d)] - alone).abs().max().item() <= 1e-4
            start += len(d)
