"""`danlu api` with the official openai client, under load, with disconnects and per-request LoRA."""
import concurrent.futures
import resource
import time

import httpx
import pytest

import danlu
from danlu.tuning.lora import load_adapter

pytestmark = pytest.mark.real

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in French.",
             "What is the largest planet?", "Give me a synonym of happy.", "Who wrote Hamlet?",
             "What is water made of?", "Name a fruit that is yellow.", "What day comes after Monday?",
             "How many legs does a spider have?", "What is the opposite of hot?", "Name a programming language.",
             "What colour is the sky?", "What is the boiling point of water?", "Spell the word cat."]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0, timeout=300)


def test_chat_completion_with_openai_client(client):
    reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=30,
                                           messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Write a short sentence about the sea."}]
    whole = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24, messages=messages)
    chunks = list(client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24, messages=messages,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_models(client):
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in out.choices[0].text and out.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["smollm2", "user-a", "user-b"]


def test_sixteen_concurrent_clients_equal_their_answers_alone(client, real_lm):
    # Questions whose greedy answers have no near-ties: batched float32 matmuls are not bit-for-bit those of one
    # row, and "Say hello in Chinese." (answered with broken bytes) flipped between two tokens in one CI run.
    alone = [danlu.chat(real_lm, q, temperature=0, max_new_tokens=24) for q in QUESTIONS]

    def ask(question):
        return client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                              messages=[{"role": "user", "content": question}])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, QUESTIONS))
    assert [r.choices[0].message.content for r in replies] == alone


def test_clients_that_disconnect_leave_the_server_healthy(server, client):
    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    body = {"model": "smollm2", "max_tokens": 400, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}]}
    before = None
    for round_ in range(4):
        for _ in range(4):
            with httpx.stream("POST", f"{server['base_url']}/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if '"content"' in line and '""' not in line:
                        break  # got streamed text: hang up
        deadline = time.time() + 30
        while server["engine"].load["running"] and time.time() < deadline:
            time.sleep(0.1)
        assert server["engine"].load == {"running": 0, "waiting": 0, "slots": 16, "free_slots": 16}
        if round_ == 0:
            before = rss_mib()
    assert rss_mib() - before < 50  # peak memory flat across rounds of abandoned streams
    reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=20,
                                           messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert "Paris" in reply.choices[0].message.content


def test_two_adapters_in_one_batch_match_chat_with_each(client, adapters, real_gguf):
    question = "Tell me about the moon."

    def reference(adapter):
        lm = danlu.load(real_gguf, dtype="float32")
        if adapter:
            load_adapter(lm.model, adapters[adapter])
        return danlu.chat(lm, question, temperature=0, max_new_tokens=20)

    expected = {name: reference(name) for name in ("user-a", "user-b", None)}
    assert len(set(expected.values())) == 3  # the adapters really change the answer

    def ask(model):
        return client.chat.completions.create(model=model, temperature=0, max_tokens=20,
                                              messages=[{"role": "user", "content": question}])

    models = ["user-a", "user-b", "smollm2"] * 2
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, models))
    for model, reply in zip(models, replies):
        assert reply.choices[0].message.content == expected[None if model == "smollm2" else model]


@pytest.mark.parametrize("body,status,message", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "smollm2", "messages": []}, 400, "messages"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     "exceed the context of 8192 tokens by"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ({"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "over the context"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, message):
    r = httpx.post(f"{server['base_url']}/chat/completions", json=body, timeout=60)
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_malformed_json_is_a_400(server):
    r = httpx.post(f"{server['base_url']}/chat/completions", content=b'{"model": "smollm2", "messages": [',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()


def test_danlu_api_command_serves_on_loopback(tmp_path):
    import os
    import subprocess
    import sys

    from tests.serving.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "danlu.cli.main", "api", "--port", str(port), "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"danlu api did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
