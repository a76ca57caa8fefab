"""SmoothQuant smoothing: the model computes the same function after it (folded into norms, up_proj, v_proj), for
every decoder family; alpha "auto" picks per group from the grid; on activations with outlier channels it brings
int8 activations (W8A8) closer to the float model; bad settings are refused by name."""
import pytest
import torch

from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.quantization.smooth import ALPHA_GRID, activation_statistics, smooth
from danlu.quantization.transform import quantize, use_int8_activations

IDS = [[(7 * i + 3) % 250 + 2 for i in range(48)], [(11 * i + 5) % 250 + 2 for i in range(48)]]


def model_with_outliers(preset: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset(preset)).eval()
    with torch.no_grad():  # a few hidden channels 40x larger in what each layer's linears read, as in real LLMs
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] *= 40
            layer.mlp.up_proj.weight[:2] *= 30
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_keeps_the_models_function(preset, alpha):
    model = model_with_outliers(preset)
    with torch.no_grad():
        before = model(torch.tensor(IDS))
    maxima, samples = activation_statistics(model, [IDS])
    chosen = smooth(model, maxima, alpha, samples)
    with torch.no_grad():
        after = model(torch.tensor(IDS))
    assert float((after - before).norm() / before.norm()) < 1e-5  # float32 rounding of the rescaled products
    layers = len(model.model.layers)
    assert len(chosen) == 4 * layers and set(chosen.values()) <= set(ALPHA_GRID if alpha == "auto" else [alpha])


def test_on_outlier_channels_smoothing_brings_int8_activations_closer_to_the_float_model():
    reference = model_with_outliers("tiny-llama")
    with torch.no_grad():
        exact = reference(torch.tensor(IDS))

    def w8a8_error(smoothed: bool) -> float:
        model = model_with_outliers("tiny-llama")
        if smoothed:
            maxima, samples = activation_statistics(model, [IDS])
            smooth(model, maxima, "auto", samples)
        quantize(model, "int8", head="float")
        assert use_int8_activations(model) == 7 * len(model.model.layers)
        with torch.no_grad():
            return float((model(torch.tensor(IDS)) - exact).norm() / exact.norm())

    plain, smoothed = w8a8_error(False), w8a8_error(True)
    assert smoothed < 0.75 * plain, (plain, smoothed)  # measured: 0.235 -> 0.145


def test_bad_settings_are_refused_by_name():
    model = model_with_outliers("tiny-llama")
    maxima, samples = activation_statistics(model, [IDS])
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth(model, maxima, 1.5)
    with pytest.raises(ValueError, match="needs the calibration samples"):
        smooth(model, maxima, "auto")
    encoder = Transformer(get_preset("tiny-bert")).eval()
    with pytest.raises(ValueError, match="pre-norm decoder"):
        smooth(encoder, maxima, 0.5)


def test_calibration_text_is_fed_as_the_chat_templates_user_turns_when_there_is_one():
    from danlu.quantization.smooth import calibration_ids
    from tests.conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    chat = calibration_ids(tokenizer, ["hello there", "general kenobi"], tokens=40)
    assert len(chat) == 40 and chat.count(start) >= 2  # control tokens of the template, and only 40 tokens
    tokenizer.chat_template = None
    assert calibration_ids(tokenizer, ["hello", "there"]) == tokenizer("hello\n\nthere")["input_ids"]
