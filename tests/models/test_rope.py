"""RoPE inverse frequencies equal transformers' for the published Llama 3.1 / 3.2 scaling values."""
import pytest
import torch

from danlu.checkpoints.hf import config_to_hf
from danlu.models.presets import get_preset
from danlu.models.rope import inverse_frequencies


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "qwen3-8b"])
def test_inverse_frequencies_match_transformers(name):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config, torch.float32))
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    else:
        expected, attention_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        assert attention_scale == 1.0
    actual = inverse_frequencies(config)
    assert actual.shape == (config.head_dim // 2,)
    assert torch.allclose(actual, expected, rtol=1e-6, atol=0)


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    config = get_preset("llama-3.2-1b")
    plain = inverse_frequencies(config.replace(rope_scaling=None))
    scaled = inverse_frequencies(config)
    assert torch.equal(scaled[:4], plain[:4])  # wavelengths far below 8192 / 4
    assert torch.allclose(scaled[-4:], plain[-4:] / 32.0)  # wavelengths beyond 8192
