"""Serving throughput: aggregate output tokens/s and time to first token at 1, 4 and 16 concurrent clients
against `danlu api` (continuous batching), beside the same requests served one after another; then the 16
clients' second turns (their first exchange as history and a follow-up question). All of it twice: without and
with prefix caching.

    python bench/bench_serving.py [--model PATH] [--tokens 64] [--json OUT]

Runs the server in-process on a free loopback port with the real model (float32, CPU) and streams every
request through the OpenAI client, EOS ignored so every answer has exactly --tokens tokens. Every request's
question is new to the server (numbered), so a prefix cache can only know what prompts really share: the chat
template's system prompt, and in second turns the conversation so far.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import threading
import time

import torch

QUESTIONS = ["Tell me about the sea.", "Explain how a bicycle works.", "Describe a forest in autumn.",
             "Why is the sky blue?", "Write about a city at night.", "What makes a good friend?",
             "Describe your favourite meal.", "How do plants grow?", "Tell me a story about a cat.",
             "What is music?", "Describe a mountain.", "Explain rain to a child.", "What is a computer?",
             "Describe a busy market.", "Why do we sleep?", "Tell me about the moon."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, max_batch: int, prefix_cache_mib: float = 256.0):
    import uvicorn

    from danlu.checkpoints.load import load_pretrained
    from danlu.serving.api import create_app
    from danlu.serving.engine import Engine

    lm = load_pretrained(model_path, dtype="float32", device="cpu")
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=256,
                    prefix_cache_mib=prefix_cache_mib).start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, engine


def one_request(client, messages: list[dict], tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    text = []
    stream = client.chat.completions.create(model="bench", messages=messages,
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {"ttft": first, "seconds": time.perf_counter() - start, "tokens": usage.completion_tokens,
            "text": "".join(text)}


QUESTION_NUMBER = iter(range(1, 10**6))


def first_turns(clients: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {next(QUESTION_NUMBER)}: {QUESTIONS[i % len(QUESTIONS)]}"}]
            for i in range(clients)]


def second_turns(conversations: list[list[dict]], answers: list[dict]) -> list[list[dict]]:
    return [messages + [{"role": "assistant", "content": answer["text"]},
                        {"role": "user", "content": f"Question {next(QUESTION_NUMBER)}: tell me more."}]
            for messages, answer in zip(conversations, answers)]


def run_level(client, conversations: list[list[dict]], tokens: int, sequential: bool) -> tuple[dict, list[dict]]:
    start = time.perf_counter()
    if sequential:
        results = [one_request(client, messages, tokens) for messages in conversations]
    else:
        with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
            results = list(pool.map(lambda messages: one_request(client, messages, tokens), conversations))
    wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {"clients": len(conversations), "sequential": sequential, "wall_s": wall, "output_tokens": total,
            "tokens_per_s": total / wall, "ttft_median_s": statistics.median(r["ttft"] for r in results),
            "ttft_max_s": max(r["ttft"] for r in results)}, results


def run_server(model_path, tokens: int, prefix_cache_mib: float) -> dict:
    """The levels of 1, 4 and 16 clients (one after another, then together), then 16 second turns together."""
    from openai import OpenAI

    label = f"prefix cache {prefix_cache_mib:g} MiB" if prefix_cache_mib else "no prefix cache"
    base_url, server, engine = start_server(model_path, max_batch=16, prefix_cache_mib=prefix_cache_mib)
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    one_request(client, first_turns(1)[0], 8)  # warm-up
    rows = []
    for clients in (1, 4, 16):
        sequential, _ = run_level(client, first_turns(clients), tokens, sequential=True)
        conversations = first_turns(clients)
        concurrent_, answers = run_level(client, conversations, tokens, sequential=False)
        rows.append((sequential, concurrent_))
        print(f"{label} | {clients:>2} clients | one after another {sequential['tokens_per_s']:6.1f} tok/s, TTFT "
              f"median {sequential['ttft_median_s']:.2f} s | continuous batching "
              f"{concurrent_['tokens_per_s']:6.1f} tok/s, TTFT median {concurrent_['ttft_median_s']:.2f} s "
              f"(max {concurrent_['ttft_max_s']:.2f} s) | ratio "
              f"{concurrent_['tokens_per_s'] / sequential['tokens_per_s']:.2f}x", flush=True)
    second, _ = run_level(client, second_turns(conversations, answers), tokens, sequential=False)
    print(f"{label} | 16 second turns together: {second['tokens_per_s']:6.1f} tok/s, TTFT median "
          f"{second['ttft_median_s']:.2f} s (max {second['ttft_max_s']:.2f} s)", flush=True)
    hits = engine.runner.prefix_cache
    server.should_exit = True
    engine.stop()
    return {"prefix_cache_mib": prefix_cache_mib, "levels": [{"sequential": s, "concurrent": c} for s, c in rows],
            "second_turns": second,
            "prefix_cache_hit_tokens": hits.hit_tokens if hits else 0,
            "prefix_cache_queried_tokens": hits.queried_tokens if hits else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF or HF directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from danlu.checkpoints.bundled import ensure_bundled_model

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    model_path = args.model or ensure_bundled_model()
    without, with_ = (run_server(model_path, args.tokens, mib) for mib in (0, 256))
    for name, run in (("without", without), ("with", with_)):
        level = run["levels"][-1]
        ratio = level["concurrent"]["tokens_per_s"] / level["sequential"]["tokens_per_s"]
        print(f"{name} prefix caching: at 16 clients {ratio:.2f}x the tokens/s of one-at-a-time serving (target "
              f">= 4x: {'met' if ratio >= 4 else 'NOT met'})")
    for what, pick in (("first turns", lambda run: run["levels"][-1]["concurrent"]),
                       ("second turns", lambda run: run["second_turns"])):
        print(f"TTFT median at 16 clients, {what}: {pick(without)['ttft_median_s']:.2f} s without prefix caching, "
              f"{pick(with_)['ttft_median_s']:.2f} s with ({pick(without)['ttft_median_s'] / pick(with_)['ttft_median_s']:.2f}x)")
    print(f"prefix cache: {with_['prefix_cache_hit_tokens']} of {with_['prefix_cache_queried_tokens']} prompt tokens "
          "found")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"without_prefix_caching": without, "with_prefix_caching": with_}, f, indent=2)


if __name__ == "__main__":
    main()
