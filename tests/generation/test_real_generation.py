"""On the real SmolLM2-135M-Instruct: greedy generation equals transformers.generate token for token."""
import pytest
import torch

from danlu.generation.generate import generate
from danlu.generation.sampling import GenerationConfig
from danlu.tokenization.chat import encode_chat

pytestmark = pytest.mark.real

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.",
             "Explain photosynthesis to a child.", "用一句话介绍一下你自己。"]


@pytest.fixture(scope="module")
def prompts(real_tokenizer):
    return [encode_chat(real_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def one_by_one(real_lm, prompts):
    config = GenerationConfig(max_new_tokens=64, temperature=0)
    return [generate(real_lm.model, real_lm.tokenizer, [p], config, eos_ids=[])[0] for p in prompts]


def test_greedy_64_tokens_equal_transformers_generate(hf_real, prompts, one_by_one):
    # Neither side stops at EOS, so all 64 tokens are compared.
    saved_eos = hf_real.generation_config.eos_token_id
    hf_real.generation_config.eos_token_id = None
    try:
        for prompt, ours in zip(prompts[:2], one_by_one[:2]):
            with torch.no_grad():
                out = hf_real.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=2,
                                       attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            assert out[0, len(prompt):].tolist() == ours.token_ids
            assert len(ours.token_ids) == 64
    finally:
        hf_real.generation_config.eos_token_id = saved_eos


def test_batched_generation_equals_one_by_one(real_lm, prompts, one_by_one):
    batched = generate(real_lm.model, real_lm.tokenizer, prompts, GenerationConfig(max_new_tokens=64, temperature=0),
                       eos_ids=[])
    assert [c.token_ids for c in batched] == [c.token_ids for c in one_by_one]


def test_chat_answer_is_sensible(real_lm):
    import danlu

    answer = danlu.chat(real_lm, "What is the capital of France?", temperature=0, max_new_tokens=30)
    assert "Paris" in answer
    pieces = list(danlu.chat(real_lm, "用一句话介绍一下你自己。", temperature=0, max_new_tokens=30,
                             stream_output=True))
    assert len(pieces) > 1 and all("\ufffd" not in p for p in pieces)


def test_python_api_generate_plain_and_chat(real_lm):
    import danlu

    texts = danlu.generate(real_lm, ["The capital of France is", "1, 2, 3, 4,"], max_new_tokens=8, temperature=0)
    assert len(texts) == 2 and "Paris" in texts[0] and "5" in texts[1]
    one = danlu.complete(real_lm, "Name a colour.", chat=True, max_new_tokens=16, temperature=0)
    assert one.finish_reason in ("stop", "length") and one.text and "<|im_end|>" not in one.text
    with pytest.raises(ValueError, match="unknown generation setting"):
        danlu.generate(real_lm, "x", temprature=0.5)
