"""megatron-core as the real client: its own GPTModel (local layer spec, float32, CPU) loads danlu's mcore output and
gives danlu's logits, at TP=1 in one process and at TP=2 under a 2-process torchrun; and danlu loads a checkpoint
megatron-core wrote itself (no config.json: the model from Megatron's args) with megatron-core's logits.

Each check runs megatron-core in a torchrun subprocess (tests/checkpoints/mcore_client.py), ~25 s each here.
"""
import pytest
import torch

from danlu.checkpoints.load import load_pretrained
from danlu.cli.convert import convert
from danlu.checkpoints.megatron import MegatronSplit
from tests.checkpoints.mcore_client import (MCORE_AVAILABLE, MCORE_SKIP_REASON, run_mcore_client,
                                            save_random_mcore_checkpoint)
from tests.conftest import make_hf_model, save_hf_model

pytestmark = pytest.mark.skipif(not MCORE_AVAILABLE, reason=MCORE_SKIP_REASON)

TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
TOKENS[0, 0] = 255  # the last real vocabulary row, beside the padding
TOLERANCE = 2e-5  # float32; measured 1-2e-6 (other summation orders in mcore's attention and linears)


def danlu_logits(directory):
    lm = load_pretrained(directory, dtype="float32", device="cpu")
    with torch.no_grad():
        return lm.model(TOKENS), lm.config


@pytest.mark.parametrize("family,overrides,tp", [
    ("qwen2", {}, 1),  # GQA 4 heads in 2 groups, qkv bias, untied head, rope_theta 1e6
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}, 2),  # q/k norms, head_dim != hidden/heads, tied
], ids=["qwen2-tp1", "qwen3-tied-tp2"])
def test_megatron_core_loads_danlus_checkpoint_with_the_same_logits(tmp_path, family, overrides, tp):
    src = save_hf_model(make_hf_model(family, **overrides), tmp_path / "hf")
    megatron = convert(src, tmp_path / "megatron", megatron=MegatronSplit(tp=tp))
    expected, config = danlu_logits(src)
    logits = run_mcore_client(megatron, config.to_dict(), TOKENS, tp=tp, tmp_dir=tmp_path / "work")
    assert logits.shape == expected.shape
    difference = (logits - expected).abs().max().item()
    print(f"{family} tp={tp}: max |mcore - danlu| = {difference:.2e}")
    assert difference <= TOLERANCE


def test_danlu_loads_a_checkpoint_megatron_core_wrote(tmp_path):
    values = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                  rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=False)
    tokens = TOKENS.clone()
    tokens[0, 0] = 299
    written = save_random_mcore_checkpoint(tmp_path / "megatron", values, tokens, tp=2, tmp_dir=tmp_path / "work")
    lm = load_pretrained(tmp_path / "megatron", dtype="float32", device="cpu")
    assert lm.config.vocab_size == 512  # 300 padded to 2 x 128 x 2: Megatron's args keep only the padded size
    assert (lm.config.num_key_value_heads, lm.config.rope_theta, lm.config.tie_word_embeddings) == (2, 500000.0, False)
    with torch.no_grad():
        logits = lm.model(tokens)[..., :300]
    difference = (logits - written).abs().max().item()
    print(f"mcore-written tp=2, read by danlu: max |danlu - mcore| = {difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.real
def test_megatron_core_runs_smollm2_converted_at_tp3_with_danlus_logits(tmp_path, real_gguf, real_lm):
    """The real model: 9 heads in 3 query groups, tied head, over 3 tensor-parallel processes."""
    megatron = convert(real_gguf, tmp_path / "megatron", megatron=MegatronSplit(tp=3))
    ids = real_lm.tokenizer("The capital of France is Paris. The weather today", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = real_lm.model(ids)
    logits = run_mcore_client(megatron, real_lm.config.to_dict(), ids, tp=3, tmp_dir=tmp_path / "work")
    difference = (logits - expected).abs().max().item()
    print(f"SmolLM2 tp=3: max |mcore - danlu| = {difference:.2e} (largest logit {expected.abs().max():.1f})")
    assert difference <= 2e-4 and torch.equal(logits.argmax(-1), expected.argmax(-1))
