"""How fast one decode step can be: a static-shape step (a full-capacity KV cache written with index_copy_, a mask
over the capacity), eager and under torch.compile, for float32, int8 and int4 SmolLM2-135M, beside transformers'
own decode step. A measurement for the next piece of the quantization issue, not danlu's generate path (yet).

    python bench/bench_static_decode.py [--batch 1] [--steps 64] [--rows float32,int8,int4] [--json OUT]

Per row: ms per decode step (median of 3 runs of `--steps` steps at positions 4.. after 4 warm-up steps; the
compiled rows' first compile is not timed) and transformers' ms per step measured the same way (its model called
with a DynamicCache, one token at a time), and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from machine import ForeignLoad, machine_info, print_aligned, save_results

CAPACITY = 256
WARM_STEPS = 4


def danlu_model(kind: str):
    from danlu.checkpoints.load import load_pretrained
    from danlu.quantization.transform import prepare_kernels, quantize

    lm = load_pretrained(None, dtype="float32", device="cpu")
    if kind != "float32":
        quantize(lm.model, kind, group_size=32 if kind == "int4" else None)
        prepare_kernels(lm.model)
    return lm.model


def static_step(model, batch: int):
    """A decode step over fixed shapes: token ids [batch, 1] and the position [1] in, logits out."""
    from danlu.models.rope import apply_rope, rope_cos_sin

    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    keys = [torch.zeros(batch, kv_heads, CAPACITY, head_dim) for _ in range(config.num_hidden_layers)]
    values = [torch.zeros(batch, kv_heads, CAPACITY, head_dim) for _ in range(config.num_hidden_layers)]
    inverse = model.rope_inverse_frequencies("cpu")

    def step(ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        x = model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(inverse, position.expand(batch, 1), x.dtype)
        mask = (torch.arange(CAPACITY) <= position)[None, None, None, :]
        for i, layer in enumerate(model.model.layers):
            attention, h = layer.self_attn, layer.input_layernorm(x)
            q = attention.q_proj(h).view(batch, 1, heads, head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(batch, 1, kv_heads, head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(batch, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys[i].index_copy_(2, position, k)
            values[i].index_copy_(2, position, v)
            out = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask, enable_gqa=True)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x))

    return step


def ms_per_step(step, batch: int, steps: int) -> float:
    ids = torch.full((batch, 1), 42)
    times = []
    with torch.inference_mode():
        for position in range(WARM_STEPS):
            step(ids, torch.tensor([position]))
        for _ in range(3):
            start = time.perf_counter()
            for position in range(WARM_STEPS, WARM_STEPS + steps):
                step(ids, torch.tensor([position]))
            times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def transformers_ms_per_step(batch: int, steps: int) -> float:
    from transformers import AutoModelForCausalLM, DynamicCache

    from danlu.checkpoints.bundled import ensure_bundled_model

    gguf = ensure_bundled_model()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.full((batch, 1), 42)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            cache = DynamicCache()
            for _ in range(WARM_STEPS):
                hf(input_ids=ids, past_key_values=cache, use_cache=True)
            start = time.perf_counter()
            for _ in range(steps):
                hf(input_ids=ids, past_key_values=cache, use_cache=True)
            times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rows", default="float32,int8,int4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {"machine": machine_info(), "batch": args.batch, "steps": args.steps, "rows": {}}
    with ForeignLoad() as load:
        reference = transformers_ms_per_step(args.batch, args.steps)
        for kind in args.rows.split(","):
            model = danlu_model(kind)
            eager = ms_per_step(static_step(model, args.batch), args.batch, args.steps)
            compiled = ms_per_step(torch.compile(static_step(model, args.batch)), args.batch, args.steps)
            results["rows"][kind] = {"eager_ms": eager, "compiled_ms": compiled}
            print(f"  {kind}: eager {eager:.1f} ms, compiled {compiled:.1f} ms per step", flush=True)
    results["transformers_ms"] = reference
    results["foreign_cpu"] = round(load.share, 3)
    lines = [("transformers float32 (its own step)", f"{reference:.1f}", "1.00x", "", "")]
    for kind, row in results["rows"].items():
        lines.append((f"danlu {kind}, static step", f"{row['eager_ms']:.1f}", f"{reference / row['eager_ms']:.2f}x",
                      f"{row['compiled_ms']:.1f}", f"{reference / row['compiled_ms']:.2f}x"))
    print_aligned(("row", "eager ms/step", "x", "compiled ms/step", "x"), lines)
    print(f"batch {args.batch}; other processes used {load.share:.0%} of the CPU meanwhile")
    if args.json:
        save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
