"""llama.cpp reference figures for bench_generation.py; run with the python of a venv holding llama-cpp-python.

    /work/venv-llamacpp/bin/python bench/bench_llamacpp.py --model MODEL.gguf --prompt-ids '[1, 2, 3]'

Prints one JSON line: load time (import + Llama(...), fresh process per run, median) and decode tokens/s at
batch 1 (greedy, EOS ignored, tokens / wall time of prompt eval + generation, the same definition as
bench_generation.py). llama.cpp computes with the GGUF's own Q4_1 weights, not float32.
Never imported by danlu or its tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LOAD = """
import json, time
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path={path!r}, n_ctx=1024, n_threads={threads}, n_threads_batch={threads}, verbose=False)
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "total": t2 - t0}}))
"""


def bench_load(path: str, threads: int, runs: int) -> dict:
    samples = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", LOAD.format(path=path, threads=threads)],
                              capture_output=True, text=True, check=True)
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]} | {"runs": runs}


def decode(llm, prompt: list[int], new_tokens: int) -> list[int]:
    llm.reset()  # no reuse of the previous run's KV cache for the shared prompt prefix
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)  # EOS is not checked: always new_tokens tokens
        if len(out) == new_tokens:
            break
    return out


def bench_decode(path: str, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    decode(llm, prompt, min(16, new_tokens))  # warm-up
    times, tokens = [], []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = decode(llm, prompt, new_tokens)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens": len(tokens), "tokens_per_s": len(tokens) / seconds, "runs": runs,
            "batch": 1, "token_ids": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-ids", required=True, help="the prompt as a JSON list of token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import llama_cpp

    result = {"version": llama_cpp.__version__, "threads": args.threads,
              "load": bench_load(args.model, args.threads, args.runs),
              "decode": bench_decode(args.model, json.loads(args.prompt_ids), args.new_tokens, args.runs,
                                     args.threads)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
