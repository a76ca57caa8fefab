"""GGUF files (llama.cpp): read the config and dequantized weights with the `gguf` package.

llama.cpp stores q/k projections of Llama-architecture models with rows permuted for its own RoPE
layout; they are permuted back here so the weights match Hugging Face's.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from danlu.checkpoints.errors import CheckpointError
from danlu.models.config import ConfigError, ModelConfig
from danlu.utils.progress import progress

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: unsupported GGUF architecture {arch!r}; danlu reads {SUPPORTED_ARCHITECTURES}")

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is missing")
        return value

    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    names = {t.name for t in reader.tensors}
    heads = need("attention.head_count")
    hidden = need("embedding_length")
    # Qwen3 writes its head_dim as the key length; Llama writes it as the RoPE dimension.
    head_dim = _field(reader, f"{arch}.attention.key_length") or \
        _field(reader, f"{arch}.rope.dimension_count", hidden // heads)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=int(heads),
            num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            intermediate_size=int(need("feed_forward_length")),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            qkv_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
            name=str(_field(reader, "general.name", "")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _undo_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _decode(tensor, config: ModelConfig, source: str) -> tuple[str, np.ndarray]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    name = _our_name(tensor.name)
    if name is None:
        raise CheckpointError(f"{source}: unexpected GGUF tensor {tensor.name!r}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = np.array(tensor.data).reshape(shape)  # a copy: the file is memory-mapped read-only
        else:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{source}: cannot decode tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}") from e
    if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        array = _undo_permutation(array, heads)
    return name, array


def gguf_state_dict(reader, config: ModelConfig, expected: dict[str, torch.Size], dtype: torch.dtype,
                    source: str, show_progress: bool = False) -> dict[str, torch.Tensor]:
    tensors = [t for t in reader.tensors if not t.name.endswith("rope_freqs.weight")]
    state: dict[str, torch.Tensor] = {}
    bar = progress(total=len(tensors), desc="Dequantizing GGUF", disable=not show_progress)
    # numpy releases the GIL in the arithmetic of dequantization, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for tensor, (name, array) in zip(tensors, pool.map(lambda t: _decode(t, config, source), tensors)):
            bar.update(1)
            if name not in expected:
                raise CheckpointError(f"{source}: tensor {tensor.name!r} ({name}) is not part of this model")
            if tuple(array.shape) != tuple(expected[name]):
                raise CheckpointError(f"{source}: tensor {tensor.name!r} has shape {array.shape}, "
                                      f"expected {tuple(expected[name])}")
            state[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    bar.close()
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")
    return state


def cache_dir_for(path: Path, cache_root: Path) -> Path:
    """Where the conversion of one GGUF file is kept (keyed by name, size and modification time)."""
    stat = Path(path).stat()
    return Path(cache_root) / f"{Path(path).stem}-{stat.st_size}-{stat.st_mtime_ns}"


def gguf_tokenizer(path: Path, cache_root: Path):
    """The GGUF's tokenizer and chat template as a transformers tokenizer.

    transformers converts the GGUF vocabulary in several seconds; the result is saved in the file's
    cache directory and read back from tokenizer.json afterwards.
    """
    from transformers import AutoTokenizer

    from danlu.utils.atomic import atomic_directory

    cached = cache_dir_for(path, cache_root)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    if not cached.exists():
        try:
            with atomic_directory(cached) as tmp:
                tokenizer.save_pretrained(str(tmp))
        except OSError:
            pass  # a read-only cache only costs speed
    return tokenizer
