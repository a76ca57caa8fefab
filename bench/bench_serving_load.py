"""Serving under a careless crowd: C clients x R requests against `danlu api`, a quarter of them hanging up (mid-
stream, or mid-request before a non-streamed answer came); every answer that completes must equal the same
question answered alone (greedy), no KV-cache slot may leak, /health must stay ok, and the server's peak memory
must stay flat (within 5%) from the first round of requests to the last.

    python bench/bench_serving_load.py [--model PATH] [--clients 16] [--requests 20] [--tokens 32] [--json OUT]

Exit status 1 when a check fails (tests/serving/test_serving_load.py runs a short version of it).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import resource
import sys
import time

import httpx

from bench_serving import QUESTIONS, start_server


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chat_body(question: str, tokens: int, stream: bool) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": stream}


def ask(http: httpx.Client, base: str, question: str, tokens: int, stream: bool) -> str:
    if not stream:
        r = http.post(f"{base}/chat/completions", json=chat_body(question, tokens, False), timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    text = []
    with http.stream("POST", f"{base}/chat/completions", json=chat_body(question, tokens, True), timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    text.append(choices[0]["delta"]["content"])
    return "".join(text)


def hang_up(http: httpx.Client, base: str, question: str, tokens: int, stream: bool) -> None:
    """Leave before the answer is complete: after the first streamed piece, or 0.3 s into a non-streamed one."""
    if stream:
        with http.stream("POST", f"{base}/chat/completions", json=chat_body(question, tokens, True),
                         timeout=600) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    return
        return
    try:
        http.post(f"{base}/chat/completions", json=chat_body(question, tokens, False), timeout=0.3)
    except httpx.TimeoutException:
        pass


def client_run(base: str, client: int, requests: int, tokens: int, solo: dict, every: int) -> dict:
    counts = {"answered": 0, "equal": 0, "left": 0, "mismatches": []}
    with httpx.Client() as http:
        for i in range(requests):
            question = QUESTIONS[(client * requests + i) % len(QUESTIONS)]
            stream = (client + i) % 2 == 0
            if (client * requests + i) % every == every - 1:
                hang_up(http, base, question, tokens, stream)
                counts["left"] += 1
                continue
            answer = ask(http, base, question, tokens, stream)
            counts["answered"] += 1
            if answer == solo[question]:
                counts["equal"] += 1
            else:
                counts["mismatches"].append({"question": question, "alone": solo[question], "in_load": answer})
    return counts


def wait_idle(engine, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and (engine.load["running"] or engine.load["waiting"]):
        time.sleep(0.05)


def run(model, clients: int, requests: int, tokens: int, max_batch: int, disconnect_every: int) -> dict:
    base, server, engine = start_server(model, max_batch)
    root = base.removesuffix("/v1")
    try:
        with httpx.Client() as http:
            questions = sorted({QUESTIONS[k % len(QUESTIONS)] for k in range(clients * requests)})
            solo = {q: ask(http, base, q, tokens, stream=False) for q in questions}
        rounds, rss = [], []
        started = time.perf_counter()
        for round_ in range(2):  # the same load twice: memory after the first is the baseline
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                rounds += list(pool.map(lambda c: client_run(base, c, requests // 2 + (round_ and requests % 2),
                                                             tokens, solo, disconnect_every), range(clients)))
            wait_idle(engine)
            rss.append(peak_rss_mib())
        seconds = time.perf_counter() - started
        health = httpx.get(f"{root}/health", timeout=10)
        load = engine.load
        result = {
            "clients": clients, "requests": clients * requests, "tokens": tokens, "max_batch": max_batch,
            "answered": sum(r["answered"] for r in rounds), "equal_to_alone": sum(r["equal"] for r in rounds),
            "hung_up": sum(r["left"] for r in rounds), "seconds": round(seconds, 1),
            "after": load, "slot_invariant": engine.scheduler.check_invariants(), "health": health.status_code,
            "peak_rss_mib_after_round": [round(x) for x in rss],
            "cancelled_by_engine": engine.metrics.requests.get("cancelled", 0),
            "mismatches": [m for r in rounds for m in r["mismatches"]][:3],
            "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        }
    finally:
        server.should_exit = True
        engine.stop()
    result["checks"] = {
        "every completed answer equals its answer alone": result["equal_to_alone"] == result["answered"],
        "no slot leaked": load["running"] == 0 and load["waiting"] == 0 and load["free_slots"] == max_batch
        and result["slot_invariant"] is None,
        "health ok": result["health"] == 200,
        "peak RSS flat within 5% from round 1 to round 2": rss[1] <= rss[0] * 1.05,
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="per client, over two rounds")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--disconnect-every", type=int, default=4, help="every k-th request hangs up (4: 25%%)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.model, args.clients, args.requests, args.tokens, args.max_batch, args.disconnect_every)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    failed = [name for name, ok in result["checks"].items() if not ok]
    for name in failed:
        print(f"FAILED: {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
