"""Generation on tiny models: batching, stop conditions, streaming text, context limits."""
import pytest
import torch

from danlu.generation.generate import ContextOverflow, decode_steps, generate, stream
from danlu.generation.sampling import GenerationConfig
from danlu.generation.text import IncrementalDecoder, find_stop
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer


class ByteTokenizer:
    """Token i is byte i: enough to exercise multi-byte UTF-8 decoding without a vocabulary file."""
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class LetterTokenizer:
    """Token i is one ASCII letter: every piece of text is whole."""
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny-llama")).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]


def test_batched_greedy_equals_one_by_one(tiny):
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    batched = generate(tiny, ByteTokenizer(), PROMPTS, config, eos_ids=[])
    alone = [generate(tiny, ByteTokenizer(), [p], config, eos_ids=[])[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in batched)


def test_greedy_equals_argmax_of_full_forward(tiny):
    ids = list(PROMPTS[1])
    expected = []
    with torch.no_grad():
        for _ in range(6):
            token = tiny(torch.tensor([ids + expected]))[0, -1].argmax().item()
            expected.append(token)
    got = generate(tiny, ByteTokenizer(), [ids], GenerationConfig(max_new_tokens=6, temperature=0), eos_ids=[])
    assert got[0].token_ids == expected


def test_eos_ends_a_row_and_others_continue(tiny):
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    free = generate(tiny, ByteTokenizer(), PROMPTS, config, eos_ids=[])
    eos = free[0].token_ids[2]  # make row 0's third token its end
    ended = generate(tiny, ByteTokenizer(), PROMPTS, config, eos_ids=[eos])
    assert ended[0].finish_reason == "stop" and ended[0].token_ids == free[0].token_ids[:2]
    for before, after in zip(free[1:], ended[1:]):
        cut = before.token_ids.index(eos) if eos in before.token_ids else len(before.token_ids)
        assert after.token_ids == before.token_ids[:cut]


def test_seeded_sampling_is_reproducible(tiny):
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, seed=11)
    first = generate(tiny, ByteTokenizer(), PROMPTS, config, eos_ids=[])
    again = generate(tiny, ByteTokenizer(), PROMPTS, config, eos_ids=[])
    other = generate(tiny, ByteTokenizer(), PROMPTS, config.updated(seed=12), eos_ids=[])
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_stop_string_cuts_text(tiny):
    config = GenerationConfig(max_new_tokens=10, temperature=0)
    free = generate(tiny, LetterTokenizer(), [PROMPTS[1]], config, eos_ids=[])[0]
    stop = free.text[3:5]
    stopped = generate(tiny, LetterTokenizer(), [PROMPTS[1]], config.updated(stop=[stop]), eos_ids=[])[0]
    assert stopped.text == free.text[:free.text.index(stop)] and stopped.finish_reason == "stop"


def test_prompt_longer_than_context_is_refused(tiny):
    too_long = [5] * tiny.config.max_position_embeddings
    with pytest.raises(ContextOverflow, match="over by 1"):
        next(decode_steps(tiny, [too_long], GenerationConfig(), eos_ids=[]))


def test_new_tokens_are_capped_by_the_context(tiny):
    prompt = [5] * (tiny.config.max_position_embeddings - 3)
    out = generate(tiny, ByteTokenizer(), [prompt], GenerationConfig(max_new_tokens=50, temperature=0), eos_ids=[])
    assert len(out[0].token_ids) == 3 and out[0].finish_reason == "length"


def test_empty_prompt_is_refused(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, ByteTokenizer(), [[]], GenerationConfig(), eos_ids=[])


def test_incremental_decoder_never_splits_a_character():
    text = "héllo 世界 ok"
    decoder = IncrementalDecoder(ByteTokenizer())
    pieces = [decoder.add(b) for b in text.encode("utf-8")] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_holds_back_a_possible_stop_string():
    decoder = IncrementalDecoder(ByteTokenizer(), stops=["<END>"])
    pieces = [decoder.add(b) for b in "abc<EN".encode()]
    assert "".join(pieces) == "abc"  # "<EN" might start "<END>"
    assert decoder.add(ord("D")) == "" and decoder.add(ord(">")) == "" and decoder.stopped
    decoder = IncrementalDecoder(ByteTokenizer(), stops=["<END>"])
    assert "".join(decoder.add(b) for b in "a<Ex".encode()) == "a<Ex"


def test_find_stop_returns_earliest():
    assert find_stop("abc###def<|x|>", ["<|x|>", "###"]) == 3
    assert find_stop("abc", ["z"]) is None


def test_stream_yields_the_same_text_as_generate(tiny):
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    whole = generate(tiny, ByteTokenizer(), [PROMPTS[0]], config, eos_ids=[])[0].text
    finish = {}
    assert "".join(stream(tiny, ByteTokenizer(), PROMPTS[0], config, eos_ids=[], finish=finish)) == whole
    assert finish == {"reason": "length", "tokens": 12}


# ---------------------------------------------------------------- one sampling state per row (generation/sequence.py)

SAMPLED = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7, repetition_penalty=1.3)


def test_a_seeded_answer_is_the_same_whatever_batch_it_is_decoded_in(tiny):
    prompts = PROMPTS + [[5, 6, 7]]
    together = [c.token_ids for c in generate(tiny, LetterTokenizer(), prompts, SAMPLED, eos_ids=[])]
    for batch_size in (1, 3):
        assert [c.token_ids for c in generate(tiny, LetterTokenizer(), prompts, SAMPLED, eos_ids=[],
                                              batch_size=batch_size)] == together
    assert together[3] != together[0]  # the same prompt twice: two samples (seed 7 + 3 against 7)
    first_alone = generate(tiny, LetterTokenizer(), [prompts[0]], SAMPLED, eos_ids=[])[0].token_ids
    assert first_alone == together[0] and "".join(stream(tiny, LetterTokenizer(), prompts[0], SAMPLED,
                                                         eos_ids=[])) == LetterTokenizer().decode(together[0])


def test_prompt_indices_give_each_prompt_its_seed_and_must_match_the_prompts(tiny):
    second_alone = generate(tiny, LetterTokenizer(), [PROMPTS[1]], SAMPLED, eos_ids=[], prompt_indices=[1])[0]
    assert second_alone.token_ids == generate(tiny, LetterTokenizer(), PROMPTS, SAMPLED, eos_ids=[])[1].token_ids
    with pytest.raises(ValueError, match="2 prompt_indices for 3 prompts"):
        generate(tiny, LetterTokenizer(), PROMPTS, SAMPLED, eos_ids=[], prompt_indices=[0, 1])


def test_the_ith_prompt_samples_as_the_servers_ith_choice(tiny):
    from fastapi.testclient import TestClient

    from danlu.serving.api import create_app
    from danlu.serving.engine import Engine
    from tests.serving.test_api_unit import CharTokenizer

    tokenizer = CharTokenizer()
    engine = Engine(tiny, tokenizer, max_batch=3, eos_ids=[]).start()
    try:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "n": 3, "seed": 7, "temperature": 1.0,
                "top_p": 1.0, "repetition_penalty": 1.3}
        served = [c["text"] for c in TestClient(create_app(engine, "tiny")).post("/v1/completions", json=body)
                  .json()["choices"]]
    finally:
        engine.stop()
    ids = tokenizer("abc")["input_ids"]
    config = SAMPLED.updated(top_k=0)
    assert served == [c.text for c in generate(tiny, tokenizer, [ids] * 3, config, eos_ids=[])]
    assert len(set(served)) == 3


def test_a_stop_string_ends_each_row_where_it_appears_in_a_batch_as_alone(tiny):
    config = SAMPLED.updated(max_new_tokens=40, stop=["e"])
    together = generate(tiny, LetterTokenizer(), PROMPTS, config, eos_ids=[])
    for i, completion in enumerate(together):
        alone = generate(tiny, LetterTokenizer(), [PROMPTS[i]], config.for_row(i), eos_ids=[])[0]
        assert (completion.text, completion.finish_reason) == (alone.text, alone.finish_reason)
        assert "e" not in completion.text and (completion.finish_reason == "stop" or len(completion.token_ids) == 40)
    assert any(c.finish_reason == "stop" for c in together)
