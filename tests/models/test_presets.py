import pytest

from danlu.models.config import ConfigError, ModelConfig
from danlu.models.presets import PRESETS, get_preset
from danlu.models.transformer import build_meta_model, count_parameters

PUBLISHED = {
    "qwen2-7b": 7_615_616_512,
    "qwen2-72b": 72_706_203_648,
    "qwen1.5-7b": 7_721_324_544,
    "llama-2-7b": 6_738_415_616,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name,expected", PUBLISHED.items())
def test_parameter_counts_match_published_sizes(name, expected):
    assert count_parameters(build_meta_model(get_preset(name))) == expected


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
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type must be one of"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
])
def test_bad_config_values_name_the_field(field, value, message):
    values = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8)
    values[field] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"vocab_size": 8, "hidden_sise": 4})
