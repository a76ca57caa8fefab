"""Serving throughput: aggregate output tokens/s and time to first token at 1, 4 and 16 concurrent clients
against `danlu api` (continuous batching), beside the same requests served one after another.

    python bench/bench_serving.py [--model PATH] [--tokens 64] [--json OUT]

Runs the server in-process on a free loopback port with the real model (float32, CPU) and streams every
request through the OpenAI client, EOS ignored so every answer has exactly --tokens tokens.
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


def start_server(model_path, max_batch: int):
    import uvicorn

    from danlu.checkpoints.load import load_pretrained
    from danlu.serving.api import create_app
    from danlu.serving.engine import Engine

    lm = load_pretrained(model_path, dtype="float32", device="cpu")
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=256).start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, engine


def one_request(client, question: str, tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    text = []
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
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
    return {"ttft": first, "seconds": time.perf_counter() - start, "tokens": usage.completion_tokens}


def run_level(client, clients: int, tokens: int, sequential: bool) -> dict:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)]
    start = time.perf_counter()
    if sequential:
        results = [one_request(client, q, tokens) for q in questions]
    else:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda q: one_request(client, q, tokens), questions))
    wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "sequential": sequential, "wall_s": wall, "output_tokens": total,
            "tokens_per_s": total / wall, "ttft_median_s": statistics.median(r["ttft"] for r in results),
            "ttft_max_s": max(r["ttft"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF or HF directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from openai import OpenAI

    from danlu.checkpoints.bundled import ensure_bundled_model

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    base_url, server, engine = start_server(args.model or ensure_bundled_model(), max_batch=16)
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    one_request(client, QUESTIONS[0], 8)  # warm-up
    rows = []
    for clients in (1, 4, 16):
        sequential = run_level(client, clients, args.tokens, sequential=True)
        concurrent_ = run_level(client, clients, args.tokens, sequential=False)
        rows.append((sequential, concurrent_))
        print(f"{clients:>2} clients | one after another {sequential['tokens_per_s']:6.1f} tok/s, TTFT median "
              f"{sequential['ttft_median_s']:.2f} s | continuous batching {concurrent_['tokens_per_s']:6.1f} tok/s, "
              f"TTFT median {concurrent_['ttft_median_s']:.2f} s (max {concurrent_['ttft_max_s']:.2f} s) | "
              f"ratio {concurrent_['tokens_per_s'] / sequential['tokens_per_s']:.2f}x", flush=True)
    server.should_exit = True
    engine.stop()
    target = rows[-1][1]["tokens_per_s"] / rows[-1][0]["tokens_per_s"]
    print(f"target: at 16 clients >= 4x the tokens/s of one-at-a-time serving: {target:.2f}x "
          f"{'met' if target >= 4 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"sequential": s, "concurrent": c} for s, c in rows], f, indent=2)


if __name__ == "__main__":
    main()
