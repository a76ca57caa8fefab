"""API behaviour that needs no running model: authentication and a full queue."""

import pytest
from fastapi.testclient import TestClient

from danlu.generation.sampling import GenerationConfig
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.serving.api import create_app
from danlu.serving.engine import Engine, QueueFull, Request


class CharTokenizer:
    chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):  # a string, or a list of them, as transformers'
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) % 256 for c in text]}

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=True,
                            **template_kwargs):  # as transformers: extra keys go to the template
        return "".join(m["content"] + "\n" for m in messages)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture
def engine():
    return Engine(Transformer(get_preset("tiny-llama")), CharTokenizer(), max_batch=2, max_queue=1)


def test_api_key_is_required_when_set(engine):
    client = TestClient(create_app(engine, "tiny", api_key="s3cret"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 503  # no key needed; the engine loop is not started here


def test_full_queue_answers_429(engine):
    engine.submit(Request([1, 2], GenerationConfig(max_new_tokens=2), emit=lambda e: None))  # not started: stays
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], GenerationConfig(max_new_tokens=2), emit=lambda e: None))
    client = TestClient(create_app(engine, "tiny"))
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_engine_serves_tiny_model_end_to_end(engine):
    engine.start()
    try:
        client = TestClient(create_app(engine, "tiny"))
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        engine.stop()


def test_ignore_eos_generates_exactly_max_tokens():
    import torch

    model = Transformer(get_preset("tiny-llama")).eval()
    with torch.no_grad():  # make the first greedy token of the prompt the end-of-sequence token
        first = int(model(torch.tensor([[ord(c) % 256 for c in "abc"]]))[0, -1].argmax())
    engine = Engine(model, CharTokenizer(), max_batch=2, max_queue=4, eos_ids=[first]).start()
    try:
        client = TestClient(create_app(engine, "tiny"))
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "temperature": 0}
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 1
        r = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 6 and r["choices"][0]["finish_reason"] == "length"
    finally:
        engine.stop()


def run_to_end(engine, prompts, max_new_tokens=6):
    """Drive the engine's steps in this thread; the tokens each prompt got."""
    requests = [engine.submit(Request(p, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0),
                                      emit=lambda e: None)) for p in prompts]
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
    return [r.generated for r in requests]


def test_rows_shorter_than_the_batch_ignore_garbage_in_unused_cache_positions():
    # The slot cache is torch.empty: a short row's keys/values past its length (below the longest row's) may
    # hold NaN from earlier use of that memory; 0 * NaN in attention once made a CI answer end after one token.
    model = Transformer(get_preset("tiny-llama")).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21]]
    alone = [run_to_end(Engine(model, CharTokenizer(), max_batch=2, eos_ids=[]), [p])[0] for p in prompts]
    engine = Engine(model, CharTokenizer(), max_batch=2, eos_ids=[])
    for tensor in engine.runner.cache.keys + engine.runner.cache.values:
        tensor.fill_(float("nan"))
    assert run_to_end(engine, prompts) == alone
