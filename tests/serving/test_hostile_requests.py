"""Requests as a hostile or careless client sends them: none may hang the engine, leak a slot or crash a handler.
A tiny random model and a character tokenizer: the engine's bookkeeping is under test, not the answers."""
import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient

from danlu.generation.sampling import GenerationConfig
from danlu.generation.sequence import SequenceState
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.serving.api import APIError, create_app
from danlu.serving.engine import Engine, Request
from danlu.serving.runner import ModelRunner
from tests.serving.test_api_unit import CharTokenizer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("tiny-llama")).eval()


@pytest.fixture
def served(model):
    engine = Engine(model, CharTokenizer(), max_batch=4, max_queue=8, eos_ids=[]).start()
    yield engine, TestClient(create_app(engine, "tiny", max_body_bytes=4000))
    engine.stop()


def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sixteen_requests_with_a_seed_out_of_range_then_a_normal_one_is_answered(served):
    engine, client = served
    for _ in range(16):
        r = client.post("/v1/chat/completions", json={**CHAT, "seed": 2**70, "temperature": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    started = time.monotonic()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert time.monotonic() - started < 5
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["running"] == 0 and health.json()["free_slots"] == 4


def test_a_failure_inside_one_request_frees_its_slot_and_answers_that_client(served, monkeypatch):
    engine, client = served
    original = SequenceState.choose

    def choose(self, logits):
        if self.config.seed == 666:
            raise RuntimeError("boom")
        return original(self, logits)

    monkeypatch.setattr(SequenceState, "choose", choose)
    r = client.post("/v1/chat/completions", json={**CHAT, "seed": 666, "temperature": 1})
    assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert engine.load["running"] == 0 and engine.scheduler.check_invariants() is None


def test_a_model_failure_fails_the_running_requests_and_the_engine_goes_on(served, monkeypatch):
    engine, client = served
    calls = {"n": 0}
    decode = ModelRunner.decode

    def failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory (pretend)")
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "decode", failing_once)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert engine.scheduler.check_invariants() is None and engine.alive


class GoneClient:
    """An HTTP request whose client has left."""

    async def is_disconnected(self):
        return True


def test_a_non_streaming_client_that_leaves_is_aborted_with_its_whole_group(served):
    engine, client = served
    service = client.app.state.service
    config = GenerationConfig(max_new_tokens=200, temperature=0)
    jobs = [([5, 6, 7], config)] * 3  # n = 3

    async def leave():
        with pytest.raises(APIError, match="closed the connection"):
            await service.run_group(jobs, None, GoneClient(), ignore_eos=True, top=None)

    started = time.monotonic()
    asyncio.run(leave())
    # the scheduler frees the slots, then the engine thread ends each request (and counts it)
    wait_until(lambda: engine.metrics.requests["cancelled"] == 3)
    assert time.monotonic() - started < 3  # not the 200 tokens' time
    assert engine.load["running"] == 0 and engine.load["waiting"] == 0
    assert engine.scheduler.check_invariants() is None


def test_a_group_that_does_not_fit_the_queue_is_refused_whole(model):
    engine = Engine(model, CharTokenizer(), max_batch=1, max_queue=2, eos_ids=[])  # not started: nothing leaves
    client = TestClient(create_app(engine, "tiny"))
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 2})
    assert r.status_code == 429 and engine.load["waiting"] == 0


def test_a_body_over_the_limit_is_413_and_a_lone_surrogate_is_400(served):
    _, client = served
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    raw = '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": "\xff"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_logprobs_in_openais_shapes(served):
    _, client = served
    body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    text = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3, "temperature": 0,
                                                "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(text["tokens"]) == len(text["token_logprobs"]) == 3 and all(len(t) <= 2 for t in text["top_logprobs"])
    assert client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}).status_code == 400
    assert client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["logprobs"] is None


def test_metrics_are_prometheus_text(served):
    _, client = served
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    assert 'danlu:request_success_total{finished_reason="length"} 1' in text
    assert "danlu:generation_tokens_total 4" in text and "danlu:num_requests_running 0" in text
    assert 'danlu:time_to_first_token_seconds_bucket{le="+Inf"} 1' in text
    assert "danlu:time_per_output_token_seconds_count 3" in text  # the first token comes from the prefill


def test_health_says_unhealthy_when_the_loop_is_gone(model):
    engine = Engine(model, CharTokenizer(), max_batch=1, eos_ids=[]).start()
    client = TestClient(create_app(engine, "tiny"))
    assert client.get("/health").status_code == 200
    engine.stop()
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["problem"] == "the engine loop is not running"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 503


def test_stop_drains_running_requests_then_aborts_what_is_left(model):
    for drain, reason in ((10.0, "length"), (0.0, "cancelled")):
        engine = Engine(model, CharTokenizer(), max_batch=1, eos_ids=[]).start()
        ends = []
        engine.submit(Request([5, 6], GenerationConfig(max_new_tokens=40, temperature=0),
                              emit=lambda e: e.finish_reason and ends.append(e.finish_reason)))
        engine.stop(drain_timeout=drain)
        assert ends == [reason]


def test_batched_and_chunked_prefill_equal_one_prompt_at_a_time(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    alone = torch.stack([ModelRunner(model, 1).prefill([0], [p])[0] for p in prompts])
    batched = ModelRunner(model, 3).prefill([0, 1, 2], prompts)
    chunked = ModelRunner(model, 3, chunk=3).prefill([2, 0, 1], prompts)
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(chunked, alone, atol=1e-5)
    runner = ModelRunner(model, 3, chunk=3)  # and decoding after a chunked prefill continues each prompt
    runner.prefill([0, 1, 2], prompts)
    full = [model(torch.tensor([p + [3]]))[0, -1] for p in prompts]
    assert torch.allclose(runner.decode([0, 1, 2], [3, 3, 3]), torch.stack(full), atol=1e-5)
