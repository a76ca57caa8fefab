"""`danlu model-info PRESET_OR_PATH`: architecture, parameter counts and memory, without loading weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from danlu.generation.kv_cache import kv_values_per_token
from danlu.low_rank.checkpoint import install_low_rank, read_low_rank
from danlu.models.config import ModelConfig
from danlu.models.transformer import build_meta_model, count_parameters

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def add_parser(sub, name):
    parser = sub.add_parser(name, help="describe a model: architecture, parameters, memory (no weights loaded)")
    parser.add_argument("model", nargs="?", default=None, help="preset, .gguf file or Hugging Face directory")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def describe(config: ModelConfig, low_rank: Optional[dict[str, int]] = None) -> dict:
    """low_rank: a factorized checkpoint's {layer: rank} (danlu factorize), counted as its two factors."""
    model = build_meta_model(config)
    install_low_rank(model, low_rank or {})
    total = count_parameters(model)
    embedding = config.vocab_size * config.hidden_size
    per_layer = count_parameters(model.model.layers[0])
    kv_per_token = kv_values_per_token(config)
    return {
        "name": config.name,
        "config": config.to_dict(),
        "parameters": total,
        "parameters_per_layer": per_layer,
        "embedding_parameters": embedding,
        "non_embedding_parameters": total - embedding * (2 if config.has_lm_head and not config.tie_word_embeddings else 1),
        "factorized_layers": len(low_rank or {}),
        "weights_bytes": {d: int(total * b) for d, b in DTYPE_BYTES.items()},
        # An encoder reads its whole input at once: it keeps no KV cache.
        "kv_cache_bytes_per_token": {d: int(kv_per_token * b) for d, b in DTYPE_BYTES.items()
                                     if b >= 1 and config.causal},
    }


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def positions_row(c: dict) -> tuple[str, str]:
    if c["position_embedding_type"] == "rope":
        return "rope", f"theta {c['rope_theta']:g}" + (f", scaling {c['rope_scaling']}" if c["rope_scaling"] else "")
    return "positions", f"learned absolute embeddings ({c['max_position_embeddings']})"


def run(args) -> int:
    from danlu.checkpoints.load import load_config

    low_rank = read_low_rank(args.model) if args.model and (Path(args.model) / "config.json").is_file() else {}
    info = describe(load_config(args.model), low_rank)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    attention = "MHA" if c["num_key_value_heads"] == c["num_attention_heads"] else \
        ("MQA" if c["num_key_value_heads"] == 1 else "GQA")
    rows = [
        ("name", c["name"] or "-"), ("architecture", c["architecture"]),
        ("layers", c["num_hidden_layers"]), ("hidden size", c["hidden_size"]),
        ("attention", f"{attention}{'' if c['causal'] else ' (bidirectional)'}: {c['num_attention_heads']} heads, "
                      f"{c['num_key_value_heads']} KV heads, head dim {c['head_dim']}"),
        ("intermediate size", c["intermediate_size"]), ("mlp", c["mlp"]),
        ("norm", f"{c['norm']} (eps {c['norm_eps']})"), ("vocab", c["vocab_size"]),
        ("context", c["max_position_embeddings"]),
        positions_row(c),
        ("qkv bias", c["qkv_bias"]), ("tied embeddings", c["tie_word_embeddings"]),
        ("sliding window", c["sliding_window"] or "-"),
        ("parameters", info["parameters"]),
        ("non-embedding parameters", info["non_embedding_parameters"]),
    ]
    if low_rank:
        rows.append(("factorized layers", f"{len(low_rank)} (danlu factorize; ranks {min(low_rank.values())}-"
                                          f"{max(low_rank.values())})"))
    for dtype, n in info["weights_bytes"].items():
        rows.append((f"weights in {dtype}", _gib(n)))
    for dtype, n in info["kv_cache_bytes_per_token"].items():
        rows.append((f"KV cache per token ({dtype})", f"{n:,} bytes"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
