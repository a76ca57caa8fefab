"""The compression report: each way of making the real SmolLM2-135M-Instruct smaller, side by side in one process
beside transformers' float32 decode, with the issue's targets. CPU.

    python bench/bench_compression.py [--quick] [--json OUT] [--threads N] [--rows "danlu int8,danlu int4 g32"]
                                      [--llamacpp-python /path/to/venv/bin/python]

Rows (all from the bundled Q4_1 GGUF):
  transformers float32   AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)
  danlu float32 / bf16   danlu.load(gguf, dtype="float32" / "bfloat16")
  danlu int8             the float32 load, then danlu.quantization.transform.quantize(model, "int8")
  danlu int8 W8A8        danlu int8 with use_int8_activations: activations quantized per row (dynamic) from 5 rows
                         on, one torch._int_mm (VNNI/AMX) per layer; its ppl windows take that path too
  ... SmoothQuant W8A8    the same after SmoothQuant's smoothing (danlu.quantization.smooth, alpha "auto" per group of
                         layers, calibrated on 4,096 tokens of danlu_text.jsonl's other paragraphs, each a user turn
                         of the chat template, as danlu quantize --int8-activations does; ~20 s, not in
                         the quantize() time)
  danlu int4 gG          the float32 load, then quantize(model, "int4", group_size=G): int4's default, a zero point
                         per group; "sym" symmetric (a scale only)
  danlu GGUF Q4_1        danlu.load(gguf) (dtype "auto"): the file's 4-bit blocks kept and computed on
  ... compiled           the row above decoded with generate(..., decoding="compiled"): a static-shape step under
                         torch.compile (danlu.generation.decoders); its first call compiles (the warm-up, untimed)
  llama.cpp              with --llamacpp-python: bench/bench_llamacpp.py in its own virtualenv (decode b1, load)
quantize() keeps the head at int8 per row whatever the method (its default), so every int8/int4 row has an int8
head; the float32 model is itself the Q4_1 file dequantized, so "float32" means exact Q4_1 values.
transformers float32 and danlu float32 are always measured: they are the references of the ratios and of the
agreement and perplexity targets.

Columns:
  ppl        perplexity (danlu.evaluation.perplexity: non-overlapping 512-token windows, every token after a
             window's first predicted once) over the last 50 paragraphs of data/danlu_text.jsonl joined by blank
             lines, tokenized by the GGUF's tokenizer without special tokens; transformers' logits go through the
             same function. In brackets: the change against danlu float32. The windows are 512-token forwards, so
             quantized layers take their reference path (dequantized weight, float32 product), not the kernel.
  params     weight values the model holds: unique parameters plus out x in of every quantized linear layer (a
             quantized copy of a tied head counts again: the float embedding stays for the lookup).
  linear MB  bytes of the linear layers' weights (the head included): WeightOnlyLinear.storage_bytes() for a
             quantized layer (codes, scales, zeros), numel x element size otherwise. MB = 10^6 bytes.
  model MB   every parameter and buffer of the model, each storage once.
  kernel MB  the extra copy of the quantized weights in the kernels' own layout, built on the first forward and
             kept beside the portable form (so the resident size is model MB + kernel MB).
  file MB    on disk: int8/int4 rows write save_torchao_checkpoint(quantized_state_dict(model), config, tmp,
             float32, tokenizer) and sum its *.safetensors ("not savable" with the reason where it raises); the
             GGUF rows the .gguf file; float rows what save_hf_checkpoint would write (each state tensor once, a
             tied head left out, numel x element size of the dtype).
  b1 / b8    decode tokens/s at batch 1 (one chat prompt) and batch 8 (eight chat prompts, left-padded for
             transformers), bench_generation.py's functions unchanged: greedy, EOS ignored, tokens/s = generated
             tokens / wall time of the whole generate call (prefill of the prompts included), one warm-up, then
             the median of N runs, the runs interleaved between all the rows so that background noise hits them
             alike. (x) = tokens/s / transformers float32's tokens/s. llama.cpp runs after the others, alone.
  load s     danlu GGUF Q4_1 and danlu float32: danlu.load(gguf, dtype=...) (model and tokenizer) in a fresh
             `python -c` per run (OMP_NUM_THREADS = the thread count), warm caches (one unmeasured load first),
             median of N runs interleaved: the load call alone, and in brackets import danlu + load. llama.cpp:
             bench_llamacpp.py's Llama(...) and import + Llama(...). Other rows: n/a.
  agree      of the first 32 greedy tokens at batch 1 (16 with --quick), how many equal danlu float32's at the same
             position, and (@) the first position that differs (after it the two continue different texts).
             transformers' min_new_tokens masks EOS where danlu emits it, so it may also part at an EOS.
The foreign CPU load (other processes' share of the machine) is printed and saved for every section.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from bench_generation import (BATCH1_QUESTION, BATCH8_QUESTIONS, bench_llamacpp, chat_ids, danlu_decode, hf_decode,
                              measured, median, median_timings, run_load_snippet, timed, timed_rounds)
from machine import machine_info, print_aligned, print_foreign_load, save_results

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "data" / "danlu_text.jsonl"
PPL_PARAGRAPHS = 50
PPL_CTX = 512
AGREE_TOKENS = 32
MB = 1e6
HF_REFERENCE, DANLU_REFERENCE = "transformers float32", "danlu float32"
GGUF_ROW, LLAMACPP_ROW = "danlu GGUF Q4_1", "llama.cpp"


@dataclass(frozen=True)
class Method:
    name: str
    engine: str = "danlu"                # "danlu" | "transformers" | "llama.cpp"
    dtype: Optional[str] = "float32"     # danlu.load's dtype; "auto" keeps a GGUF's blocks
    quant: Optional[tuple] = None        # quantize(model, method, group_size, symmetric)
    kind: Optional[str] = None           # "int8" | "int4": which of the targets apply
    load: bool = False                   # load time measured (fresh process)
    decoding: str = "dynamic"            # generate's decoding: "compiled" = the static step under torch.compile
    int8_activations: bool = False       # quantization.transform.use_int8_activations (W8A8, dynamic per row)
    smooth: bool = False                 # quantization.smooth (SmoothQuant, alpha "auto") before quantizing


METHODS = [
    Method(HF_REFERENCE, engine="transformers"),
    Method(DANLU_REFERENCE, load=True),
    Method("danlu bf16", dtype="bfloat16"),
    Method("danlu int8", quant=("int8", None, None), kind="int8"),
    Method("danlu int8 W8A8", quant=("int8", None, None), kind="int8", int8_activations=True),
    Method("danlu int4 g32", quant=("int4", 32, None), kind="int4"),  # None: int4's default, a zero point
    Method("danlu int4 g32 sym", quant=("int4", 32, True), kind="int4"),
    Method("danlu int4 g64", quant=("int4", 64, None), kind="int4"),
    Method("danlu int4 g128", quant=("int4", 128, None), kind="int4"),
    Method(GGUF_ROW, dtype="auto", kind="int4", load=True),
    Method("danlu float32 compiled", decoding="compiled"),
    Method("danlu int8 compiled", quant=("int8", None, None), kind="int8", decoding="compiled"),
    Method("danlu int8 W8A8 compiled", quant=("int8", None, None), kind="int8", decoding="compiled",
           int8_activations=True),
    Method("danlu int8 SmoothQuant W8A8", quant=("int8", None, None), kind="int8", int8_activations=True,
           smooth=True),
    Method("danlu int8 SmoothQuant W8A8 compiled", quant=("int8", None, None), kind="int8", decoding="compiled",
           int8_activations=True, smooth=True),
    Method("danlu int4 g32 compiled", quant=("int4", 32, None), kind="int4", decoding="compiled"),
    Method(GGUF_ROW + " compiled", dtype="auto", kind="int4", decoding="compiled"),
    Method(LLAMACPP_ROW, engine="llama.cpp"),
]
BY_NAME = {m.name: m for m in METHODS}
# The targets: decode x transformers float32 at b1 and b8, perplexity change against float32, load.
DECODE_TARGETS = {"int8": 2.0, "int4": 2.5}
PPL_TARGETS = {"int8": 0.01, "int4": 0.05}
LOAD_TARGET_S = 1.0


# ---------------------------------------------------------------- rows and models

def select_methods(rows: Optional[str], llamacpp: bool) -> list[Method]:
    """The rows asked for (all by default, llama.cpp only with its python), the two references always first."""
    if rows is None:
        names = [m.name for m in METHODS if m.engine != "llama.cpp" or llamacpp]
    else:
        names = [n.strip() for n in rows.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {[m.name for m in METHODS]}")
        if LLAMACPP_ROW in names and not llamacpp:
            raise SystemExit("--rows: the llama.cpp row needs --llamacpp-python")
    chosen = {HF_REFERENCE, DANLU_REFERENCE, *names}
    return [m for m in METHODS if m.name in chosen]


class LogitsOf(torch.nn.Module):
    """transformers' model as danlu's perplexity() takes a model: forward(ids) -> logits, config, parameters."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = hf.config

    def forward(self, ids):
        return self.hf(ids).logits


def load_row(method: Method, gguf: Path):
    """(model object, seconds to quantize or None): a danlu Pretrained, or transformers' model."""
    if method.engine == "transformers":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                    dtype=torch.float32).eval(), None
    import danlu
    from danlu.quantization.transform import prepare_kernels, quantize, use_int8_activations

    lm = danlu.load(str(gguf), dtype=method.dtype, device="cpu")
    seconds = None
    if method.quant:
        kind, group_size, symmetric = method.quant
        if method.smooth:
            smooth_row(lm)
        seconds, _ = timed(lambda: quantize(lm.model, kind, group_size=group_size, symmetric=symmetric))
        use_int8_activations(lm.model, method.int8_activations)
    prepare_kernels(lm.model)  # the kernel layouts now, not inside the first timed call (warm-up does it too)
    return lm, seconds


def smooth_row(lm) -> None:
    """SmoothQuant with alpha "auto", calibrated on 4,096 tokens of the paragraphs the perplexity does not use, each a
    user turn of the chat template."""
    from danlu.quantization.smooth import activation_statistics, calibration_batches, calibration_ids, smooth

    lines = [json.loads(line)["text"] for line in TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = calibration_ids(lm.tokenizer, lines[:-PPL_PARAGRAPHS])  # as `danlu quantize --int8-activations`
    maxima, samples = activation_statistics(lm.model, calibration_batches(ids), sample_rows=512)
    smooth(lm.model, maxima, "auto", samples)


def load_rows(methods: list[Method], gguf: Path) -> dict:
    models, info = {}, {}
    for m in methods:
        if m.engine == "llama.cpp":
            continue
        seconds, (model, quantize_s) = timed(lambda: load_row(m, gguf))
        models[m.name] = model
        info[m.name] = {"build_s": round(seconds, 2), "quantize_s": quantize_s and round(quantize_s, 2)}
        print(f"  {m.name}: built in {seconds:.1f} s" + (f" (quantize {quantize_s:.1f} s)" if quantize_s else ""),
              flush=True)
    return models, info


def torch_model(model):
    """The nn.Module of a row: a danlu Pretrained's model, or transformers' model itself."""
    from danlu.checkpoints.load import Pretrained

    return model.model if isinstance(model, Pretrained) else model


# ---------------------------------------------------------------- decode, every row interleaved

def decoders(models: dict, prompts: list[list[int]], pad_id: int) -> dict:
    """name -> fn(new_tokens) -> token ids per prompt, bench_generation's danlu_decode / hf_decode."""
    fns = {}
    for name, model in models.items():
        if BY_NAME[name].engine == "transformers":
            fns[name] = lambda n, hf=model: hf_decode(hf, prompts, n, pad_id)
        else:
            fns[name] = lambda n, lm=model, decoding=BY_NAME[name].decoding: danlu_decode(lm, prompts, n, decoding)
    return fns


def bench_decode_rows(engines: dict, batch: int, new_tokens: int, runs: int) -> dict:
    """bench_generation.bench_decode for any number of engines: warm-up, then `runs` rounds, each engine once per
    round in the same order; the median time per engine, the last run's tokens."""
    times, outputs = timed_rounds(engines, new_tokens, runs)
    result = {}
    for name, t in times.items():
        generated = sum(len(row) for row in outputs[name])
        assert generated == new_tokens * batch, f"{name} made {generated} tokens"
        result[name] = {"seconds": median(t), "all_seconds": t, "tokens": generated,
                        "tokens_per_s": generated / median(t), "runs": runs, "batch": batch,
                        "first_tokens": outputs[name][0][:AGREE_TOKENS]}
    return result


def agreement(tokens: list[int], reference: list[int], k: int = AGREE_TOKENS) -> dict:
    """Of the first k tokens, how many equal the reference's at the same position, and the first that differs."""
    a, b = list(tokens[:k]), list(reference[:k])
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return {"equal": sum(a[i] == b[i] for i in range(n)), "of": n, "first_difference": first}


# ---------------------------------------------------------------- perplexity

def held_out_ids(tokenizer, paragraphs: int = PPL_PARAGRAPHS) -> list[int]:
    lines = [json.loads(line)["text"] for line in TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\n\n".join(lines[-paragraphs:])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bench_perplexity(models: dict, ids: list[int], ctx: int) -> dict:
    from danlu.evaluation.perplexity import perplexity

    out = {}
    for name, model in models.items():
        module = LogitsOf(model) if BY_NAME[name].engine == "transformers" else model.model
        seconds, r = timed(lambda: perplexity(module, ids, ctx))
        out[name] = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
                     "seconds": round(seconds, 2)}
        print(f"  {name}: ppl {r.perplexity:.4f} ({r.windows} windows, {seconds:.1f} s)", flush=True)
    return out


# ---------------------------------------------------------------- sizes

def unique_tensors(tensors) -> list[torch.Tensor]:
    """Each storage once (a tied head is the embedding)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen.setdefault((t.device, t.data_ptr(), tuple(t.shape), t.dtype), t)
    return list(seen.values())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_values(model: torch.nn.Module) -> int:
    from danlu.quantization.transform import quantized_layers

    plain = sum(p.numel() for p in unique_tensors(model.parameters()))
    return plain + sum(layer.in_features * layer.out_features for layer in quantized_layers(model).values())


def linear_bytes(model: torch.nn.Module) -> int:
    from danlu.quantization.linear import WeightOnlyLinear

    total = 0
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear):
            total += module.storage_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += nbytes(module.weight)
    return total


def model_bytes(model: torch.nn.Module) -> int:
    return sum(nbytes(t) for t in unique_tensors([*model.parameters(), *model.buffers()]))


def kernel_bytes(model: torch.nn.Module) -> int:
    """The quantized layers' kernel layouts (danlu keeps them in a private attribute, built on first use)."""
    from danlu.quantization.transform import quantized_layers

    total = 0
    for layer in quantized_layers(model).values():
        kernel = getattr(layer, "_kernel", None)
        if kernel is not None:
            total += sum(nbytes(t) for t in (kernel.packed, kernel.scales, kernel.zeros) if t is not None)
    return total


def float_file_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """What save_hf_checkpoint would write for a float model: each state tensor once, floats in `dtype`."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in unique_tensors(model.state_dict().values()))


def torchao_file_bytes(lm) -> tuple[Optional[int], Optional[str]]:
    """Bytes of the *.safetensors save_torchao_checkpoint writes for a quantized model, or (None, why not)."""
    from danlu.checkpoints.errors import CheckpointError
    from danlu.checkpoints.torchao import save_torchao_checkpoint
    from danlu.quantization.transform import quantized_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "checkpoint"
        try:
            save_torchao_checkpoint(quantized_state_dict(lm.model), lm.config, out, torch.float32, lm.tokenizer)
        except CheckpointError as e:
            return None, str(e)
        return sum(p.stat().st_size for p in out.glob("*.safetensors")), None


def file_size(method: Method, model, gguf: Path) -> tuple[Optional[int], Optional[str]]:
    if method.dtype == "auto":
        return gguf.stat().st_size, None
    if method.quant:
        return torchao_file_bytes(model)
    dtype = torch.bfloat16 if method.dtype == "bfloat16" else torch.float32
    return float_file_bytes(torch_model(model), dtype), None


def bench_sizes(methods: list[Method], models: dict, gguf: Path) -> dict:
    out = {}
    for m in methods:
        if m.engine == "llama.cpp":
            out[m.name] = {"file_bytes": gguf.stat().st_size, "file_note": None}
            continue
        module = torch_model(models[m.name])
        file_bytes, why = file_size(m, models[m.name], gguf)
        out[m.name] = {"params": held_values(module), "linear_bytes": linear_bytes(module),
                       "model_bytes": model_bytes(module), "kernel_bytes": kernel_bytes(module),
                       "file_bytes": file_bytes, "file_note": why}
    return out


# ---------------------------------------------------------------- load time, fresh process per run

LOAD = """
import json, time
t0 = time.perf_counter()
import danlu
t1 = time.perf_counter()
lm = danlu.load({path!r}, dtype={dtype!r}, device="cpu")
assert lm.tokenizer is not None
t2 = time.perf_counter()
from danlu.quantization.transform import quantized_layers
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "total": t2 - t0,
                  "quantized_layers": len(quantized_layers(lm.model))}}))
"""


def bench_load(methods: list[Method], gguf: Path, runs: int, threads: int) -> dict:
    """Each timed row's danlu.load in a fresh interpreter, after one unmeasured load (warm caches); interleaved."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    codes = {m.name: LOAD.format(path=str(gguf), dtype=m.dtype) for m in methods if m.load}
    for code in codes.values():
        run_load_snippet(sys.executable, code, env)  # warm-up: conversion caches exist, files in the page cache
    samples = {name: [] for name in codes}
    for i in range(runs):
        for name, code in codes.items():
            samples[name].append(run_load_snippet(sys.executable, code, env))
        print(f"  load run {i + 1}/{runs}: " + ", ".join(f"{n} {s[-1]['load']:.2f} s (with import "
                                                           f"{s[-1]['total']:.2f} s)" for n, s in samples.items()),
              flush=True)
    return {name: median_timings(s) for name, s in samples.items()}


# ---------------------------------------------------------------- report

def mb(value: Optional[int]) -> str:
    return "" if value is None else f"{value / MB:.1f}"


def table_rows(methods: list[Method], results: dict) -> list[tuple]:
    ppl, sizes, loads = results["perplexity"], results["sizes"], results.get("load", {})
    b1, b8 = results["decode_b1"], results["decode_b8"]
    llama = results.get("llamacpp")
    ref_ppl = ppl[DANLU_REFERENCE]["perplexity"]
    lines = []
    for m in methods:
        name, size = m.name, sizes.get(m.name, {})
        if name in ppl:
            p = ppl[name]["perplexity"]
            ppl_text = f"{p:.3f}" + ("" if name == DANLU_REFERENCE else f" ({(p / ref_ppl - 1) * 100:+.2f}%)")
        else:
            ppl_text = "n/a"
        file_text = mb(size.get("file_bytes")) if size.get("file_bytes") is not None else "not savable"
        b1_tps = llama["decode"]["tokens_per_s"] if name == LLAMACPP_ROW else b1[name]["tokens_per_s"]
        b1_text = speed_text(b1_tps, b1[HF_REFERENCE]["tokens_per_s"])
        b8_text = speed_text(b8[name]["tokens_per_s"], b8[HF_REFERENCE]["tokens_per_s"]) if name in b8 else "n/a"
        if name in loads:
            load_text = f"{loads[name]['load']:.2f} ({loads[name]['total']:.2f})"
        elif name == LLAMACPP_ROW:
            load_text = f"{llama['load']['load']:.2f} ({llama['load']['total']:.2f})"
        else:
            load_text = "n/a"
        agree = results["agreement"][name]
        agree_text = f"{agree['equal']}/{agree['of']}" + (
            f" @{agree['first_difference']}" if agree["first_difference"] is not None else "")
        lines.append((name, ppl_text, f"{size['params'] / 1e6:.1f}M" if "params" in size else "n/a",
                      mb(size.get("linear_bytes")) or "n/a", mb(size.get("model_bytes")) or "n/a",
                      mb(size.get("kernel_bytes")) or "n/a", file_text, b1_text, b8_text, load_text, agree_text))
    return lines


def speed_text(tps: float, reference: float) -> str:
    return f"{tps:.1f} ({tps / reference:.2f}x)"


def target_checks(methods: list[Method], results: dict) -> list[tuple]:
    """(target, row, figure, PASS/MISS) for every target that applies to a measured row."""
    checks = []
    ppl = results["perplexity"]
    ref_ppl = ppl[DANLU_REFERENCE]["perplexity"]
    for m in methods:
        if m.kind is None:
            continue
        goal = DECODE_TARGETS[m.kind]
        for key, label in (("decode_b1", "b1"), ("decode_b8", "b8")):
            r = results[key]
            ratio = r[m.name]["tokens_per_s"] / r[HF_REFERENCE]["tokens_per_s"]
            checks.append((f"{m.kind} decode {label} >= {goal:g}x transformers", m.name, f"{ratio:.2f}x",
                           verdict(ratio >= goal)))
        tolerance = PPL_TARGETS[m.kind]
        change = ppl[m.name]["perplexity"] / ref_ppl - 1
        checks.append((f"{m.kind} ppl within {tolerance:.0%} of float32", m.name, f"{change * 100:+.2f}%",
                       verdict(abs(change) <= tolerance)))
    if GGUF_ROW in results.get("load", {}):
        load = results["load"][GGUF_ROW]
        checks.append((f"GGUF Q4_1 load < {LOAD_TARGET_S:g} s warm (the load call)", GGUF_ROW,
                       f"{load['load']:.2f} s", verdict(load["load"] < LOAD_TARGET_S)))
        checks.append(("  (informative: the same counting import danlu)", GGUF_ROW, f"{load['total']:.2f} s",
                       verdict(load["total"] < LOAD_TARGET_S)))
    return checks


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(methods: list[Method], results: dict) -> None:
    k = min(AGREE_TOKENS, results["new_tokens"])
    print_aligned(("method", "ppl (vs f32)", "params", "linear MB", "model MB", "kernel MB", "file MB",
                   "b1 tok/s (x)", "b8 tok/s (x)", "load s (+import)", f"agree/{k}"), table_rows(methods, results))
    print(f"\n(x) = tokens/s / transformers float32's; decode = generated tokens / wall time of the whole generate "
          f"call, greedy, EOS ignored, median of {results['runs']['decode']} interleaved run(s) of "
          f"{results['new_tokens']} tokens.\nagree = first {k} batch-1 tokens equal to danlu float32's at the same "
          f"position, @ = first position that differs. MB = 10^6 bytes; kernel MB is resident beside model MB.")
    for name, size in results["sizes"].items():
        if size.get("file_note"):
            print(f"not savable, {name}: {size['file_note']}")
    for name, info in results["build"].items():
        if info.get("quantize_s"):
            print(f"{name}: quantize() took {info['quantize_s']:.1f} s after the float32 load")
    if LLAMACPP_ROW in results["agreement"]:
        print("llama.cpp: decode b1 and load from bench_llamacpp.py, run alone after the others (not interleaved); "
              "it computes on the GGUF's own Q4_1 blocks.")
    print("\ntargets (the issue's):" + ("  [--quick: a smoke run, not a figure]" if results["quick"] else ""))
    print_aligned(("target", "row", "figure", "result"), target_checks(methods, results))


# ---------------------------------------------------------------- main

def measure_in_process(methods: list[Method], gguf: Path, results: dict, new_tokens: int, decode_runs: int,
                       ppl_windows: Optional[int]) -> list[list[int]]:
    """Sections 1-4 with every row's model in this process (freed on return); returns the batch-1 prompt."""
    print("1. building the rows ...", flush=True)
    models, results["build"] = load_rows(methods, gguf)
    tokenizer = models[DANLU_REFERENCE].tokenizer
    pad_id = tokenizer.pad_token_id
    b1_prompt = chat_ids(tokenizer, [BATCH1_QUESTION])
    for key, prompts in (("decode_b1", b1_prompt), ("decode_b8", chat_ids(tokenizer, BATCH8_QUESTIONS))):
        print(f"2. {key}, every row interleaved ...", flush=True)
        engines = decoders(models, prompts, pad_id)
        measured(results, key, lambda: bench_decode_rows(engines, len(prompts), new_tokens, decode_runs))
    ids = held_out_ids(tokenizer)
    if ppl_windows:
        ids = ids[:ppl_windows * PPL_CTX]
    print(f"3. perplexity, {len(ids)} tokens in windows of {PPL_CTX} ...", flush=True)
    measured(results, "perplexity", lambda: bench_perplexity(models, ids, PPL_CTX))
    print("4. sizes (int8/int4 rows: writing the torchao checkpoint) ...", flush=True)
    measured(results, "sizes", lambda: bench_sizes(methods, models, gguf))
    return b1_prompt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--quick", action="store_true",
                   help="16 tokens, 1 run, 2 perplexity windows: a smoke test, not a figure")
    p.add_argument("--json", metavar="OUT", help="also save every figure as JSON")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--rows", help="comma-separated rows to measure (default: all); the two float32 references "
                                  f"are always measured. Rows: {', '.join(m.name for m in METHODS)}")
    p.add_argument("--llamacpp-python", metavar="PYTHON",
                   help="python of a virtualenv with llama-cpp-python: adds the llama.cpp row")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from danlu.checkpoints.bundled import ensure_bundled_model

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    methods = select_methods(args.rows, bool(args.llamacpp_python))
    gguf = Path(args.model).resolve() if args.model else ensure_bundled_model()
    new_tokens = 16 if args.quick else 128
    decode_runs, load_runs, ppl_windows = (1, 1, 2) if args.quick else (3, 3, None)

    info = machine_info()
    print(f"CPU: {info['cpu']} | cores: {info['cores']} | RAM: {info['ram_gb']} GB | python {info['python']} | "
          f"torch {info['torch']} ({info['torch_threads']} threads, every row) | transformers {info['transformers']}")
    print(f"model: {gguf}  rows: {len(methods)}  new tokens: {new_tokens}  runs: decode {decode_runs}, "
          f"load {load_runs}" + ("  [--quick: a smoke run, not a figure]" if args.quick else "") + "\n", flush=True)
    results = {"machine": info, "model": str(gguf), "rows": [m.name for m in methods], "new_tokens": new_tokens,
               "quick": args.quick, "runs": {"decode": decode_runs, "load": load_runs},
               "decode_tokens_per_s": "generated tokens / wall time of the whole generate call (prefill included)"}

    b1_prompt = measure_in_process(methods, gguf, results, new_tokens, decode_runs, ppl_windows)
    gc.collect()  # the models are gone: the fresh processes and llama.cpp get the memory and the caches
    if any(m.load for m in methods):
        print("5. load (fresh process per run, warm caches) ...", flush=True)
        measured(results, "load", lambda: bench_load(methods, gguf, load_runs, info["torch_threads"]))
    if LLAMACPP_ROW in results["rows"]:
        print("6. llama.cpp (separate virtualenv) ...", flush=True)
        measured(results, "llamacpp", lambda: bench_llamacpp(args.llamacpp_python, gguf, b1_prompt[0], new_tokens,
                                                             decode_runs, info["torch_threads"]))
    reference = results["decode_b1"][DANLU_REFERENCE]["first_tokens"]
    firsts = {name: r["first_tokens"] for name, r in results["decode_b1"].items() if isinstance(r, dict)}
    if "llamacpp" in results:
        firsts[LLAMACPP_ROW] = results["llamacpp"]["decode"]["token_ids"]
    results["agreement"] = {name: agreement(tokens, reference) for name, tokens in firsts.items()}
    results["targets"] = [dict(zip(("target", "row", "figure", "result"), c)) for c in target_checks(methods, results)]

    print()
    print_report(methods, results)
    print_foreign_load(results["foreign_cpu"], "section")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
