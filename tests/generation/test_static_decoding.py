"""Static decoding (a fixed-capacity cache, a mask over it, finished rows kept) gives what the growing cache gives,
and the compiled step traces once for every step and every call of the same shapes."""
import pytest
import torch

from danlu.generation.decoders import StaticDecoder, make_decoder, static_capacity
from danlu.generation.generate import decode_steps, generate, stream
from danlu.generation.kv_cache import StaticKVCache
from danlu.generation.sampling import GenerationConfig
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer


class ByteTokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]


def model(preset: str, **changes) -> Transformer:
    torch.manual_seed(0)
    config = get_preset(preset)
    for name, value in changes.items():
        setattr(config, name, value)
    return Transformer(config).eval()


def steps_of(lm, prompts, config, eos_ids, decoding):
    return [[(s.row, s.token, s.finish_reason, s.logprob) for s in steps]
            for steps in decode_steps(lm, prompts, config, eos_ids, logprobs=True, decoding=decoding)]


def assert_same_steps(dynamic, static, tolerance=1e-5):
    assert [[s[:3] for s in step] for step in dynamic] == [[s[:3] for s in step] for step in static]
    for a, b in zip(dynamic, static):
        assert [s[3] for s in a] == pytest.approx([s[3] for s in b], abs=tolerance)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_static_equals_dynamic_sampled_with_rows_ending_early(preset):
    lm = model(preset)
    config = GenerationConfig(max_new_tokens=14, temperature=1.0, top_k=0, top_p=1.0, seed=3,
                              repetition_penalty=1.3)
    free = steps_of(lm, PROMPTS, config, [], "dynamic")
    eos = free[3][0][1]  # row 0's fourth token ends it (and any other row that draws it)
    dynamic = steps_of(lm, PROMPTS, config, [eos], "dynamic")
    static = steps_of(lm, PROMPTS, config, [eos], "static")
    assert len(dynamic[-1]) < len(PROMPTS) or len(dynamic) < 14  # a row did leave early
    assert_same_steps(dynamic, static)


def test_static_equals_dynamic_past_the_sliding_window():
    lm = model("tiny-mistral", sliding_window=6)
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    assert_same_steps(steps_of(lm, PROMPTS, config, [], "dynamic"), steps_of(lm, PROMPTS, config, [], "static"))


def test_static_generate_and_stream_give_the_dynamic_answers():
    lm = model("tiny-llama")
    config = GenerationConfig(max_new_tokens=10, temperature=0)
    dynamic = generate(lm, ByteTokenizer(), PROMPTS, config, eos_ids=[])
    static = generate(lm, ByteTokenizer(), PROMPTS, config, eos_ids=[], decoding="static")
    assert [c.token_ids for c in static] == [c.token_ids for c in dynamic]
    assert "".join(stream(lm, ByteTokenizer(), PROMPTS[1], config, eos_ids=[], decoding="static")) == dynamic[1].text


def test_capacity_is_a_power_of_two_within_the_context():
    assert static_capacity(10, 8192) == 256
    assert static_capacity(257, 8192) == 512
    assert static_capacity(5000, 8192) == 8192
    assert static_capacity(300, 400) == 400
    assert static_capacity(100, 128) == 128


def test_a_finished_row_stays_in_the_static_batch():
    lm = model("tiny-llama")
    decoder = StaticDecoder(lm, PROMPTS, pad_id=0, max_new=4)
    with torch.inference_mode():
        decoder.prefill()
        decoder.keep(torch.tensor([0, 2]))
        logits = decoder.step(torch.tensor([1, 2]))
    assert logits.shape == (2, lm.config.vocab_size)
    assert decoder.cache.keys[0].shape[0] == len(PROMPTS)


def test_bad_decoding_and_cache_overflow_are_refused():
    lm = model("tiny-llama")
    with pytest.raises(ValueError, match="decoding must be one of"):
        make_decoder(lm, PROMPTS, 0, 4, "fast")
    cache = StaticKVCache(lm.config, 1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="holds 8 positions; 9 were asked for"):
        cache.place(7, 2)
    with pytest.raises(ValueError, match="position_ids"):
        lm(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_compiled_step_equals_dynamic_and_compiles_once():
    torch._dynamo.reset()
    lm = model("tiny-llama")
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    dynamic = steps_of(lm, PROMPTS, config, [], "dynamic")
    compiled = steps_of(lm, PROMPTS, config, [], "compiled")
    assert_same_steps(dynamic, compiled, tolerance=1e-4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1
    other = [[3, 4, 5, 6], [7], [8, 9]]  # same batch size and capacity: no new graph
    assert_same_steps(steps_of(lm, other, config, [], "dynamic"), steps_of(lm, other, config, [], "compiled"),
                      tolerance=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
