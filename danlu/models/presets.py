"""Named configurations with the published sizes of the families danlu covers (decoders and BERT encoders)."""
from __future__ import annotations

import copy
import difflib

from danlu.models.config import ModelConfig


def _family(**defaults):
    """A preset maker: the values a family shares, overridden per size."""
    def make(**sizes) -> ModelConfig:
        return ModelConfig(**{**defaults, **sizes})
    return make


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


_qwen2 = _family(architecture="qwen2", qkv_bias=True, norm_eps=1e-6, rope_theta=1_000_000.0, vocab_size=151936,
                 max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643)
_qwen3 = _family(architecture="qwen3", qk_norm=True, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0,
                 vocab_size=151936, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)
_llama2 = _family(architecture="llama", norm_eps=1e-5, rope_theta=10000.0, vocab_size=32000,
                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
_llama3 = _family(architecture="llama", norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256,
                  max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)
# BERT encoders (BertModel): bidirectional, learned positions and token types, post-norm LayerNorm blocks with
# biases, exact GELU, no lm_head; the pooler kept so that the checkpoint round-trips.
_bert = _family(architecture="bert", causal=False, position_embedding_type="absolute", type_vocab_size=2,
                embedding_norm=True, norm_position="post", norm="layernorm", norm_eps=1e-12, mlp="gelu_exact",
                qkv_bias=True, o_bias=True, mlp_bias=True, add_pooling_layer=True, max_position_embeddings=512,
                pad_token_id=0)
_smollm2 = _family(architecture="llama", norm_eps=1e-5, rope_theta=100000.0, vocab_size=49152,
                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                   pad_token_id=2)


PRESETS: dict[str, ModelConfig] = {
    "qwen2-0.5b": _qwen2(name="qwen2-0.5b", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "qwen2-1.5b": _qwen2(name="qwen2-1.5b", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
    "qwen2-7b": _qwen2(name="qwen2-7b", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "qwen2-72b": _qwen2(name="qwen2-72b", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, vocab_size=152064),
    "qwen1.5-7b": _qwen2(name="qwen1.5-7b", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, vocab_size=151936,
                         max_position_embeddings=32768),
    # Qwen2.5: the Qwen2 architecture; values of the base models' config.json.
    "qwen2.5-0.5b": _qwen2(name="qwen2.5-0.5b", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                           num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                           max_position_embeddings=32768),
    "qwen2.5-1.5b": _qwen2(name="qwen2.5-1.5b", num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                           num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
    "qwen2.5-7b": _qwen2(name="qwen2.5-7b", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                         num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    # Qwen3 dense: q/k norms, head_dim 128 whatever the width.
    "qwen3-0.6b": _qwen3(name="qwen3-0.6b", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                         num_key_value_heads=8, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": _qwen3(name="qwen3-1.7b", num_hidden_layers=28, hidden_size=2048, num_attention_heads=16,
                         num_key_value_heads=8, intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": _qwen3(name="qwen3-4b", num_hidden_layers=36, hidden_size=2560, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": _qwen3(name="qwen3-8b", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=12288),
    "llama-2-7b": _llama2(name="llama-2-7b", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                          intermediate_size=11008),
    "llama-2-13b": _llama2(name="llama-2-13b", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40,
                           intermediate_size=13824),
    "llama-2-70b": _llama2(name="llama-2-70b", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                           num_key_value_heads=8, intermediate_size=28672),
    "llama-3-8b": _llama3(name="llama-3-8b", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                          num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=8192),
    "llama-3.1-8b": _llama3(name="llama-3.1-8b", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=14336, rope_scaling=_llama3_rope(8.0)),
    "llama-3.2-1b": _llama3(name="llama-3.2-1b", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
                            rope_scaling=_llama3_rope(32.0)),
    "llama-3.2-3b": _llama3(name="llama-3.2-3b", num_hidden_layers=28, hidden_size=3072, num_attention_heads=24,
                            num_key_value_heads=8, head_dim=128, intermediate_size=8192, tie_word_embeddings=True,
                            rope_scaling=_llama3_rope(32.0)),
    "mistral-7b": ModelConfig(name="mistral-7b", architecture="mistral", num_hidden_layers=32, hidden_size=4096,
                              num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                              vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                              max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "smollm2-135m": _smollm2(name="smollm2-135m", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                             num_key_value_heads=3, intermediate_size=1536),
    "smollm2-360m": _smollm2(name="smollm2-360m", num_hidden_layers=32, hidden_size=960, num_attention_heads=15,
                             num_key_value_heads=5, intermediate_size=2560),
    "smollm2-1.7b": _smollm2(name="smollm2-1.7b", num_hidden_layers=24, hidden_size=2048, num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=8192, rope_theta=130000.0),
    # sentence-transformers/all-MiniLM-L6-v2 (its BertModel): random weights here; the real ones come from
    # danlu.checkpoints.bundled.ensure_bundled_encoder().
    "all-minilm-l6-v2": _bert(name="all-minilm-l6-v2", num_hidden_layers=6, hidden_size=384,
                              num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    # Tiny random-weight configs for fast tests; one per family switch set.
    "tiny-llama": ModelConfig(name="tiny-llama", architecture="llama", num_hidden_layers=2, hidden_size=64,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                              vocab_size=256, max_position_embeddings=256, norm_eps=1e-5,
                              bos_token_id=1, eos_token_id=2),
    "tiny-qwen2": _qwen2(name="tiny-qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-qwen3": _qwen3(name="tiny-qwen3", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=128, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-mistral": ModelConfig(name="tiny-mistral", architecture="mistral", num_hidden_layers=2, hidden_size=64,
                                num_attention_heads=4, num_key_value_heads=1, intermediate_size=128,
                                vocab_size=256, max_position_embeddings=256, sliding_window=8, norm_eps=1e-5,
                                bos_token_id=1, eos_token_id=2),
    "tiny-bert": _bert(name="tiny-bert", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                       intermediate_size=128, vocab_size=256, max_position_embeddings=64),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        close = difflib.get_close_matches(key, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown preset {name!r}.{hint} Known presets: {', '.join(preset_names())}")
    return copy.deepcopy(PRESETS[key])  # a caller may change it, rope_scaling included
