import pytest
import torch

from danlu.models.config import ConfigError, ModelConfig
from danlu.models.presets import PRESETS, get_preset
from danlu.models.transformer import build_meta_model, count_parameters

# Unique parameters (a tied embedding counts once), as the safetensors metadata on the Hugging Face hub and
# transformers' num_parameters() report them for the published checkpoints.
PUBLISHED = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,  # its safetensors also store the tied head: 2,031,739,904 there
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2-7b": 7_615_616_512,
    "qwen2-72b": 72_706_203_648,
    "qwen1.5-7b": 7_721_324_544,
    "llama-2-7b": 6_738_415_616,
    "smollm2-135m": 134_515_008,
    # sentence-transformers/all-MiniLM-L6-v2's BertModel, pooler included (its safetensors hold 22,713,728
    # numbers: the 512 more are the int64 embeddings.position_ids buffer, not a parameter).
    "all-minilm-l6-v2": 22_713_216,
}


@pytest.mark.parametrize("name,expected", PUBLISHED.items())
def test_parameter_counts_match_published_sizes(name, expected):
    assert count_parameters(build_meta_model(get_preset(name))) == expected


@pytest.mark.parametrize("name", [n for n in PUBLISHED if n.startswith(("qwen3", "qwen2.5", "llama-3."))])
def test_parameter_counts_equal_transformers_built_from_the_same_config(name):
    import transformers

    from danlu.checkpoints.hf import config_to_hf

    config = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config, torch.bfloat16))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert count_parameters(build_meta_model(config)) == reference.num_parameters()


@pytest.mark.parametrize("name", ["all-minilm-l6-v2", "tiny-bert"])
def test_bert_parameter_counts_equal_transformers_bertmodel(name):
    import transformers

    from danlu.checkpoints.hf import config_to_hf

    config = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config, torch.float32))
    with torch.device("meta"):
        reference = transformers.AutoModel.from_config(hf_config)
    assert type(reference).__name__ == "BertModel"
    assert count_parameters(build_meta_model(config)) == reference.num_parameters()


def test_all_minilm_l6_v2_shape():
    c = get_preset("all-minilm-l6-v2")
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.type_vocab_size, c.norm_eps) == \
        ("bert", 6, 384, 12, 32, 1536, 30522, 512, 2, 1e-12)
    assert not c.causal and c.position_embedding_type == "absolute" and c.norm_position == "post"
    assert c.embedding_norm and c.add_pooling_layer and c.mlp == "gelu_exact" and c.norm == "layernorm"
    assert c.qkv_bias and c.o_bias and c.mlp_bias and not c.has_lm_head


def test_decoder_presets_keep_the_decoder_defaults():
    for name, c in PRESETS.items():
        if c.architecture != "bert":
            assert (c.causal, c.position_embedding_type, c.type_vocab_size, c.embedding_norm, c.norm_position,
                    c.add_pooling_layer) == (True, "rope", 0, False, "pre", False), name


def test_qwen3_shapes_follow_the_published_config():
    c = get_preset("qwen3-8b")
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.rope_theta) == \
        ("qwen3", 36, 4096, 32, 8, 128, 12288, 151936, 40960, 1_000_000.0)
    assert c.qk_norm and not c.qkv_bias and not c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (151643, 151645)
    small = get_preset("qwen3-0.6b")
    assert small.head_dim * small.num_attention_heads == 2 * small.hidden_size and small.tie_word_embeddings


def test_llama_3_1_and_3_2_use_llama3_rope_scaling():
    assert get_preset("llama-3.1-8b").rope_scaling["factor"] == 8.0
    for name, head_dim in (("llama-3.2-1b", 64), ("llama-3.2-3b", 128)):
        c = get_preset(name)
        assert c.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert (c.head_dim, c.tie_word_embeddings, c.max_position_embeddings) == (head_dim, True, 131072)


def test_get_preset_returns_an_independent_copy():
    get_preset("llama-3.1-8b").rope_scaling["factor"] = 1.0
    assert get_preset("llama-3.1-8b").rope_scaling["factor"] == 8.0


def test_qwen2_7b_shape():
    c = get_preset("qwen2-7b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (28, 3584, 28, 4, 18944, 152064, 131072)
    assert c.qkv_bias and not c.tie_word_embeddings


def test_qwen2_72b_and_qwen15_shapes():
    c = get_preset("qwen2-72b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (80, 8192, 64, 8, 29568)
    c = get_preset("qwen1.5-7b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (32, 4096, 32, 32, 11008, 151936, 32768)


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        assert count_parameters(build_meta_model(get_preset(name))) > 0


def test_unknown_preset_suggests_close_name():
    with pytest.raises(KeyError, match="qwen2-7b"):
        get_preset("qwen2-7")


@pytest.mark.parametrize("field,value,message", [
    ("norm", "batchnorm", "norm must be one of"),
    ("mlp", "relu", "mlp must be one of"),
    ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ("hidden_size", 0, "hidden_size must be a positive integer"),
    ("sliding_window", -1, "sliding_window"),
    ("initializer_range", 0.0, "initializer_range must be positive"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type must be one of"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ("position_embedding_type", "learned", "position_embedding_type must be one of"),
    ("norm_position", "middle", "norm_position must be one of"),
    ("type_vocab_size", -1, "type_vocab_size must be a non-negative integer"),
])
def test_bad_config_values_name_the_field(field, value, message):
    values = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8)
    values[field] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"vocab_size": 8, "hidden_sise": 4})
