"""danlu vs transformers (and optionally llama.cpp) on the real SmolLM2-135M-Instruct, float32, CPU.

    python bench/bench_generation.py [--quick] [--json OUT] [--llamacpp-python /path/to/venv/bin/python]

Measured, each side by side with the same token ids and the same torch thread count:
  * GGUF load (model + tokenizer), each run in a fresh `python -c` process, median of N runs;
  * prefill tokens/s: one forward pass over a 512-token prompt, median of N runs;
  * decode tokens/s at batch 1 and batch 8, greedy, EOS ignored so every row makes the same number of
    tokens; tokens/s = generated tokens / wall time of the whole generate call (prefill of the short chat
    prompts included), the same definition for every engine.
The "x" columns are how many times faster than transformers: a throughput ratio (engine / transformers)
for tokens/s, and transformers' time / engine's time for loads, so > 1 always means faster.
llama.cpp is never imported here: `bench/bench_llamacpp.py` runs in its own virtualenv via subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import ForeignLoad, machine_info, print_aligned, print_foreign_load, save_results

HERE = Path(__file__).resolve().parent
PREFILL_TOKENS = 512
BATCH8_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in a few sentences why the sky is blue, as you would to a curious ten-year-old child.",
    "List three uses of a paperclip.",
    "Give me a short recipe for pancakes, with the ingredients first and then the steps, numbered.",
    "Who wrote Hamlet?",
    "Describe the water cycle: evaporation, condensation, precipitation and collection, one line each, "
    "and say which part of it we see when it rains on a summer afternoon in the mountains.",
    "Translate 'good morning' into Spanish.",
]
BATCH1_QUESTION = "Tell me a story about a robot who learns to paint."
TARGETS = {"decode_b1": 2.0, "decode_b8": 2.0, "load": 3.0}  # the issue's: x faster than transformers


# ---------------------------------------------------------------- machine and timing helpers

def measured(results: dict, key: str, fn):
    """results[key] = fn(), with the other processes' CPU share during it under results["foreign_cpu"]."""
    with ForeignLoad() as load:
        results[key] = fn()
    results.setdefault("foreign_cpu", {})[key] = round(load.share, 3)
    print(f"   ({key}: other processes used {load.share:.0%} of the CPU meanwhile)", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ---------------------------------------------------------------- 1. load time, fresh process per run

DANLU_LOAD = """
import json, time
t0 = time.perf_counter()
import danlu
t1 = time.perf_counter()
lm = danlu.load({path!r}, dtype="float32", device="cpu")
assert lm.tokenizer is not None
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "total": t2 - t0}}))
"""

TRANSFORMERS_LOAD = """
import json, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({dir!r}, gguf_file={name!r}, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({dir!r}, gguf_file={name!r})
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "total": t2 - t0}}))
"""


def run_load_snippet(python: str, code: str, env: dict | None = None) -> dict:
    """Run one load in a fresh interpreter; its last stdout line is the JSON of its timings."""
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"load subprocess failed:\n{proc.stderr[-3000:]}")
    timings = json.loads(proc.stdout.strip().splitlines()[-1])
    timings["process"] = wall  # interpreter start-up included
    return timings


def median_timings(samples: list[dict]) -> dict:
    return {key: median([s[key] for s in samples]) for key in samples[0]} | {"runs": len(samples)}


def bench_load(gguf: Path, runs: int) -> dict:
    danlu_code = DANLU_LOAD.format(path=str(gguf))
    hf_code = TRANSFORMERS_LOAD.format(dir=str(gguf.parent), name=gguf.name)
    run_load_snippet(sys.executable, danlu_code)  # makes sure the GGUF conversion cache exists: warm figures
    danlu_runs, hf_runs = [], []
    for i in range(runs):  # interleaved so that drift in the machine hits both alike
        danlu_runs.append(run_load_snippet(sys.executable, danlu_code))
        hf_runs.append(run_load_snippet(sys.executable, hf_code))
        print(f"  load run {i + 1}/{runs}: danlu {danlu_runs[-1]['total']:.2f} s, "
              f"transformers {hf_runs[-1]['total']:.2f} s", flush=True)
    with tempfile.TemporaryDirectory() as home:  # an empty DANLU_HOME: no converted tokenizer yet
        cold = run_load_snippet(sys.executable, danlu_code, env={**os.environ, "DANLU_HOME": home})
    print(f"  load danlu cold (empty conversion cache): {cold['total']:.2f} s", flush=True)
    return {"danlu_warm": median_timings(danlu_runs), "danlu_cold": cold, "transformers": median_timings(hf_runs)}


# ---------------------------------------------------------------- models and prompts

def load_models(gguf: Path):
    import danlu
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lm = danlu.load(str(gguf), dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return lm, hf


def prefill_ids(tokenizer, n: int = PREFILL_TOKENS) -> list[int]:
    paragraph = ("The history of the printing press begins in the fifteenth century, when movable type made "
                 "books cheaper and ideas travelled faster across Europe than ever before. ")
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(paragraph, add_special_tokens=False)["input_ids"]
    return ids[:n]


def chat_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    from danlu.tokenization.chat import encode_chat

    return [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids, mask


# ---------------------------------------------------------------- 2. prefill

def bench_prefill(lm, hf, ids: list[int], runs: int) -> dict:
    x = torch.tensor([ids])
    engines = {"danlu": lambda: lm.model(x), "transformers": lambda: hf(x)}
    times = {name: [] for name in engines}
    with torch.inference_mode():
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(runs):
            for name, fn in engines.items():
                times[name].append(timed(fn)[0])
    return {name: {"seconds": median(t), "tokens": len(ids), "tokens_per_s": len(ids) / median(t), "runs": runs}
            for name, t in times.items()}


# ---------------------------------------------------------------- 3. decode

def danlu_decode(lm, prompts: list[list[int]], new_tokens: int, decoding: str = "dynamic") -> list[list[int]]:
    from danlu.generation.generate import generate
    from danlu.generation.sampling import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0)
    return [c.token_ids for c in generate(lm.model, lm.tokenizer, prompts, config, eos_ids=[], decoding=decoding)]


def hf_decode(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id)
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def timed_rounds(engines: dict, new_tokens: int, runs: int) -> tuple[dict, dict]:
    """A warm-up, then `runs` rounds, each engine once per round in the same order (so background noise hits all
    alike): every engine's times, and its last run's tokens."""
    times = {name: [] for name in engines}
    outputs = {}
    with torch.inference_mode():
        for fn in engines.values():
            fn(min(16, new_tokens))  # warm-up
        for _ in range(runs):
            for name, fn in engines.items():
                seconds, outputs[name] = timed(lambda: fn(new_tokens))
                times[name].append(seconds)
    return times, outputs


def bench_decode(lm, hf, prompts: list[list[int]], new_tokens: int, runs: int, pad_id: int) -> dict:
    """Greedy tokens/s of both engines; also where their tokens part.

    The tokens may part only where the model picks EOS: danlu (eos_ids=[]) emits it and goes on, while
    transformers' min_new_tokens masks EOS and takes the runner-up. Both still compute every row for every
    step, so the work timed is the same.
    """
    eos_ids = set(lm.config.eos_token_ids)
    engines = {"danlu": lambda n: danlu_decode(lm, prompts, n),
               "transformers": lambda n: hf_decode(hf, prompts, n, pad_id)}
    times, outputs = timed_rounds(engines, new_tokens, runs)
    result = {}
    for name, t in times.items():
        generated = sum(len(row) for row in outputs[name])
        assert generated == new_tokens * len(prompts), f"{name} made {generated} tokens"
        result[name] = {"seconds": median(t), "tokens": generated, "tokens_per_s": generated / median(t),
                        "runs": runs, "batch": len(prompts), "prompt_tokens": [len(p) for p in prompts]}
    pairs = list(zip(outputs["danlu"], outputs["transformers"]))
    result["first_divergence"] = [first_difference(a, b) for a, b in pairs]
    result["first_eos"] = [next((i for i, t in enumerate(a) if t in eos_ids), None) for a, _ in pairs]
    result["rows_equal_until_eos"] = sum(a[:e] == b[:e] for (a, b), e in zip(pairs, result["first_eos"]))
    return result


def first_difference(a: list[int], b: list[int]):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# ---------------------------------------------------------------- 4. llama.cpp (separate venv)

def bench_llamacpp(python: str, gguf: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> dict:
    cmd = [python, str(HERE / "bench_llamacpp.py"), "--model", str(gguf), "--prompt-ids", json.dumps(prompt),
           "--new-tokens", str(new_tokens), "--runs", str(runs), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_llamacpp.py failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report

def rows(results: dict) -> list[tuple]:
    """(metric, transformers, danlu, danlu x, llama.cpp, llama.cpp x, target) per line of the table."""
    load, llama = results["load"], results.get("llamacpp")
    tf_load = load["transformers"]
    lines = []

    def time_row(label, tf_s, danlu_s, llama_s=None, target=None):
        lines.append((label, f"{tf_s:.2f} s", f"{danlu_s:.2f} s", f"{tf_s / danlu_s:.2f}x",
                      f"{llama_s:.2f} s" if llama_s else "", f"{tf_s / llama_s:.1f}x" if llama_s else "",
                      target_text(tf_s / danlu_s, target)))

    def speed_row(label, entry, llama_tps=None, target=None):
        tf, dl = entry["transformers"]["tokens_per_s"], entry["danlu"]["tokens_per_s"]
        lines.append((label, f"{tf:.1f} tok/s", f"{dl:.1f} tok/s", f"{dl / tf:.2f}x",
                      f"{llama_tps:.1f} tok/s" if llama_tps else "", f"{llama_tps / tf:.1f}x" if llama_tps else "",
                      target_text(dl / tf, target)))

    time_row("GGUF load, import + load (warm conv. cache)", tf_load["total"], load["danlu_warm"]["total"],
             llama["load"]["total"] if llama else None, TARGETS["load"])
    time_row("GGUF load, load call only (warm)", tf_load["load"], load["danlu_warm"]["load"],
             llama["load"]["load"] if llama else None)
    time_row("GGUF load, import + load (cold conv. cache)", tf_load["total"], load["danlu_cold"]["total"])
    speed_row(f"prefill {PREFILL_TOKENS} tokens, batch 1", results["prefill"])
    speed_row("decode, batch 1", results["decode_b1"], llama["decode"]["tokens_per_s"] if llama else None,
              TARGETS["decode_b1"])
    speed_row("decode, batch 8", results["decode_b8"], target=TARGETS["decode_b8"])
    return lines


def target_text(ratio: float, target) -> str:
    if target is None:
        return ""
    return f">= {target:g}x: {'met' if ratio >= target else 'NOT met'}"


def print_table(lines: list[tuple]) -> None:
    print_aligned(("metric", "transformers", "danlu", "danlu x", "llama.cpp", "llama.cpp x", "target (danlu)"), lines)


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke test, not a figure)")
    p.add_argument("--json", metavar="OUT", help="also save every figure as JSON")
    p.add_argument("--llamacpp-python", metavar="PYTHON",
                   help="python of a virtualenv with llama-cpp-python: adds a llama.cpp reference column")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from danlu.checkpoints.bundled import ensure_bundled_model

    gguf = Path(args.model).resolve() if args.model else ensure_bundled_model()
    new_tokens = 32 if args.quick else 128
    load_runs, prefill_runs, decode_runs = (1, 2, 1) if args.quick else (3, 5, 3)

    info = machine_info()
    print(f"CPU: {info['cpu']} | cores: {info['cores']} | RAM: {info['ram_gb']} GB | python {info['python']} | "
          f"torch {info['torch']} ({info['torch_threads']} threads, both engines) | transformers "
          f"{info['transformers']}")
    print(f"model: {gguf} (float32, CPU)  new tokens: {new_tokens}  runs: load {load_runs}, "
          f"prefill {prefill_runs}, decode {decode_runs}\n", flush=True)
    results = {"machine": info, "model": str(gguf), "new_tokens": new_tokens, "quick": args.quick,
               "decode_tokens_per_s": "generated tokens / wall time of the whole generate call (prefill included)"}

    print("1. load (fresh process per run) ...", flush=True)
    measured(results, "load", lambda: bench_load(gguf, load_runs))
    lm, hf = load_models(gguf)
    tokenizer, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    print("2. prefill ...", flush=True)
    measured(results, "prefill", lambda: bench_prefill(lm, hf, prefill_ids(tokenizer), prefill_runs))
    print("3. decode, batch 1 ...", flush=True)
    b1_prompt = chat_ids(tokenizer, [BATCH1_QUESTION])
    measured(results, "decode_b1", lambda: bench_decode(lm, hf, b1_prompt, new_tokens, decode_runs, pad_id))
    print("3. decode, batch 8 ...", flush=True)
    batch8 = chat_ids(tokenizer, BATCH8_QUESTIONS)
    measured(results, "decode_b8", lambda: bench_decode(lm, hf, batch8, new_tokens, decode_runs, pad_id))
    if args.llamacpp_python:
        del lm, hf  # give llama.cpp the memory and the caches
        print("4. llama.cpp (separate virtualenv) ...", flush=True)
        measured(results, "llamacpp", lambda: bench_llamacpp(args.llamacpp_python, gguf, b1_prompt[0], new_tokens,
                                                             decode_runs, info["torch_threads"]))

    print()
    print_table(rows(results))
    print("\nx = times faster than transformers (tokens/s ratio, or transformers' seconds / engine's seconds)."
          "\ndecode tokens/s = generated tokens / wall time of the generate call (prefill included), EOS ignored.")
    for key in ("decode_b1", "decode_b8"):
        r = results[key]
        print(f"{key}: greedy rows identical to transformers up to their first EOS: "
              f"{r['rows_equal_until_eos']}/{r['danlu']['batch']} (first EOS per row: {r['first_eos']}; "
              f"first differing position: {r['first_divergence']})")
    print_foreign_load(results["foreign_cpu"], "section")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
