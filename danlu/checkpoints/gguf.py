"""GGUF files (llama.cpp), read and written with the `gguf` package.

Reading gives the config and either float weights (dequantized) or, with keep_blocks, the Q4_0 / Q4_1 / Q8_0
linear weights as QuantizedWeights holding the blocks' own codes and scales (danlu.quantization.ggml_blocks),
which danlu's int4/int8 layers compute on. Writing (`save_gguf`) follows llama.cpp's convert_hf_to_gguf.py:
its metadata keys, tensor names and types, and the tokenizer with its chat template.

llama.cpp stores q/k projections of Llama-architecture models with rows permuted for its own RoPE
layout; they are permuted back on reading, and again on writing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFReader

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import DECODER_SWITCHES
from danlu.models.config import ConfigError, ModelConfig
from danlu.models.roles import COLUMN, ROW, role_of
from danlu.models.rope import inverse_frequencies
from danlu.quantization.ggml_blocks import BLOCK_BYTES, read_blocks
from danlu.quantization.weights import QuantizedWeight
from danlu.utils.atomic import fsync_path, temporary_sibling
from danlu.utils.progress import logger, progress

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
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
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


def _decode(tensor, config: ModelConfig, source: str, keep_blocks: bool = False):
    """(our name, the weight): a float32 array, or with keep_blocks a QuantizedWeight for a linear weight
    stored in one of the block types danlu computes on (Q4_0, Q4_1, Q8_0)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    name = _our_name(tensor.name)
    if name is None:
        raise CheckpointError(f"{source}: unexpected GGUF tensor {tensor.name!r}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    heads = None
    if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
    try:
        if keep_blocks and tensor.tensor_type.name in BLOCK_BYTES and _is_linear_weight(name) and len(shape) == 2:
            weight = read_blocks(tensor.data, tensor.tensor_type.name, *shape)
            if heads is not None:
                weight = weight.select_rows(torch.from_numpy(_undo_permutation(np.arange(shape[0]), heads)))
            return name, weight
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = np.array(tensor.data).reshape(shape)  # a copy: the file is memory-mapped read-only
        else:
            array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{source}: cannot decode tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}") from e
    if heads is not None:
        array = _undo_permutation(array, heads)
    return name, array


def _is_linear_weight(name: str) -> bool:
    module = name.removesuffix(".weight")
    return role_of(module) in (COLUMN, ROW) or module == "lm_head"


def gguf_state_dict(reader, config: ModelConfig, expected: dict[str, torch.Size], dtype: torch.dtype,
                    source: str, show_progress: bool = False, keep_blocks: bool = False) -> dict:
    """Every tensor under our name, as `dtype`; with keep_blocks the linear weights stored as Q4_0, Q4_1 or
    Q8_0 blocks come as QuantizedWeights holding those blocks' codes and scales (nothing dequantized)."""
    tensors = [t for t in reader.tensors if not t.name.endswith("rope_freqs.weight")]
    state: dict = {}
    bar = progress(total=len(tensors), desc="Reading GGUF" if keep_blocks else "Dequantizing GGUF",
                   disable=not show_progress)
    # numpy releases the GIL in the arithmetic of dequantization, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda t: _decode(t, config, source, keep_blocks), tensors)
        for tensor, (name, value) in zip(tensors, decoded):
            bar.update(1)
            if name not in expected:
                raise CheckpointError(f"{source}: tensor {tensor.name!r} ({name}) is not part of this model")
            if tuple(value.shape) != tuple(expected[name]):
                raise CheckpointError(f"{source}: tensor {tensor.name!r} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(expected[name])}")
            state[name] = value if isinstance(value, QuantizedWeight) else \
                torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    bar.close()
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")
    return state


def cache_dir_for(path: Path, cache_root: Path, kind: str = "") -> Path:
    """Where a conversion of one GGUF file is kept (keyed by name, size and modification time; `kind` tells
    conversions of the same file apart)."""
    stat = Path(path).stat()
    return Path(cache_root) / f"{Path(path).stem}-{stat.st_size}-{stat.st_mtime_ns}{'-' + kind if kind else ''}"


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


# ---------------------------------------------------------------- writing, as llama.cpp's convert_hf_to_gguf.py does

GGUF_FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
DEFAULT_GGUF_FILE_TYPE = "f16"  # convert_hf_to_gguf's default --outtype
# The llama.cpp architecture that runs each of ours: convert_hf_to_gguf converts Mistral as llama.
GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_LAYER_NAMES = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}
_GGUF_GLOBAL_NAMES = {ours: theirs for theirs, ours in _GLOBAL_NAMES.items()}
_OUR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# The token embedding and the output matrix keep 8 bits in a 4-bit file, as llama-quantize keeps them in a
# wider type (its K-quants are beyond the gguf package's writer).
_EMBEDDING_NAMES = ("token_embd.weight", "output.weight")

# llama.cpp tells byte-level BPE tokenizers apart by the SHA-256 of the ids one gives for this text, and stores
# the name it finds as tokenizer.ggml.pre: its pre-tokenizer (how text is split before the merges).
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# llama.cpp's names for the hashes of the tokenizers of the Llama, Mistral and Qwen families and their kin.
_PRE_TOKENIZER_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def check_gguf_file_type(file_type: str) -> None:
    if file_type not in GGUF_FILE_TYPES:
        raise ValueError(f"--type: unknown GGUF file type {file_type!r}; choose one of {', '.join(GGUF_FILE_TYPES)}")


def check_gguf_exportable(config: ModelConfig) -> None:
    """Refuse, before any weight is read, a model that llama.cpp could not run as written."""
    arch = config.architecture
    if arch not in GGUF_ARCHITECTURE:
        raise CheckpointError(f"a {arch} model cannot be written as GGUF; danlu writes {', '.join(GGUF_ARCHITECTURE)}")
    problems = [f"{name}={getattr(config, name)!r} (a decoder has {value!r})"
                for name, value in DECODER_SWITCHES.items() if getattr(config, name) != value]
    if config.norm != "rmsnorm" or config.mlp != "swiglu":
        problems.append(f"norm={config.norm!r}, mlp={config.mlp!r} (llama.cpp's {arch} has rmsnorm and swiglu)")
    if config.qk_norm != (arch == "qwen3"):
        problems.append("only Qwen3 has q/k norms, and it always has them (qk_norm)")
    if arch == "qwen2" and (not config.qkv_bias or config.o_bias or config.mlp_bias):
        problems.append("llama.cpp's qwen2 has biases on q, k and v only")
    if arch == "qwen3" and (config.qkv_bias or config.o_bias or config.mlp_bias):
        problems.append("llama.cpp's qwen3 has no biases")
    if problems:
        raise CheckpointError(f"this model cannot be written as a GGUF {GGUF_ARCHITECTURE[arch]}: "
                              + "; ".join(problems))


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's name for one of ours (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _OUR_LAYER.fullmatch(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"blk.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def save_gguf(state: dict[str, torch.Tensor], config: ModelConfig, path: Path, file_type: str = DEFAULT_GGUF_FILE_TYPE,
              tokenizer=None, show_progress: bool = False) -> Path:
    """Write the model as one GGUF file that llama.cpp (and Ollama) run, with the metadata, tensor names and
    types, q/k row order and vocabulary convert_hf_to_gguf.py gives the same model.

    `state` has danlu's names; `file_type` is one of GGUF_FILE_TYPES. The file is written beside `path` and
    renamed into place when complete, so a crash leaves no partial file under `path`.
    """
    check_gguf_file_type(file_type)
    check_gguf_exportable(config)
    path = Path(path)
    planned = _planned_tensors(state, config, file_type)
    writer = gguf.GGUFWriter(None, GGUF_ARCHITECTURE[config.architecture])
    for name, tensor, qtype in planned:
        _add_tensor_info(writer, name, tuple(tensor.shape), qtype)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(config.name).name or path.stem)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    _add_hyperparameters(writer, config, file_type, has_vocabulary=tokenizer is not None)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_vocabulary(writer, tokenizer, config)
    else:
        logger.warning("%s: no tokenizer, so the GGUF has no vocabulary; llama.cpp cannot run it as it is", path)
    _write_atomically(writer, planned, config, path, show_progress)
    return path


def _write_atomically(writer, planned: list[tuple], config: ModelConfig, path: Path, show_progress: bool) -> None:
    """The header, the metadata and the tensors, each converted as it is written (one at a time in memory), into
    a temporary sibling renamed to `path` once it is on the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    bar = progress(total=len(planned), desc="Writing GGUF", disable=not show_progress)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor, qtype in planned:
            writer.write_tensor_data(gguf.quants.quantize(_gguf_array(name, tensor, config), qtype))
            bar.update(1)
        writer.close()
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    fsync_path(path.parent)


def _planned_tensors(state: dict[str, torch.Tensor], config: ModelConfig, file_type: str) -> list[tuple]:
    """(llama.cpp's name, our tensor, the type it is stored in) for every tensor of the file, in its order."""
    planned = []
    rope_factors = _llama3_rope_factors(config)
    if rope_factors is not None:
        planned.append(("rope_freqs.weight", rope_factors, gguf.GGMLQuantizationType.F32))
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd as the output matrix when there is no output.weight
        gguf_name = gguf_tensor_name(name)
        if gguf_name is None:
            raise CheckpointError(f"{name}: a tensor llama.cpp's {GGUF_ARCHITECTURE[config.architecture]} has no "
                                  f"place for")
        planned.append((gguf_name, tensor, _tensor_type(gguf_name, tensor.shape, file_type)))
    if "model.embed_tokens.weight" not in state or not (config.tie_word_embeddings or "lm_head.weight" in state):
        raise CheckpointError("the state has no token embedding or no output matrix (lm_head.weight)")
    return planned


def _tensor_type(gguf_name: str, shape, file_type: str):
    """What convert_hf_to_gguf (and, for 4 bits, llama-quantize) stores a tensor as: vectors and norms in F32,
    the matrices in the file's type, F16 where a row does not divide into the type's blocks."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[file_type.upper()]
    if qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1) and gguf_name in _EMBEDDING_NAMES:
        qtype = gguf.GGMLQuantizationType.Q8_0
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size:
        logger.warning("%s: rows of %d values do not divide into %s blocks of %d; stored as F16",
                       gguf_name, shape[-1], qtype.name, block_size)
        return gguf.GGMLQuantizationType.F16
    return qtype


def _add_tensor_info(writer, name: str, shape: tuple[int, ...], qtype) -> None:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=qtype)
    else:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def _gguf_array(gguf_name: str, tensor: torch.Tensor, config: ModelConfig) -> np.ndarray:
    """The tensor as float32, with llama.cpp's q/k row order for the llama architecture."""
    array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if GGUF_ARCHITECTURE[config.architecture] == "llama":
        if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
            array = _llama_cpp_permutation(array, config.num_attention_heads)
        elif gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
            array = _llama_cpp_permutation(array, config.num_key_value_heads)
    return np.ascontiguousarray(array)


def _llama_cpp_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of _undo_permutation: each head's rows as llama.cpp's RoPE pairs them."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(config: ModelConfig) -> torch.Tensor | None:
    """Llama 3.1's RoPE scaling, as llama.cpp takes it: a divisor per frequency (rope_freqs.weight)."""
    if config.rope_type != "llama3":
        return None
    return inverse_frequencies(config.replace(rope_scaling=None)) / inverse_frequencies(config)


def _add_hyperparameters(writer, config: ModelConfig, file_type: str, has_vocabulary: bool) -> None:
    arch = GGUF_ARCHITECTURE[config.architecture]
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    # transformers' Llama, Mistral and Qwen3 configs have a head_dim, which convert_hf_to_gguf writes as the
    # key and value length; Qwen2's has none.
    if arch != "qwen2" or config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    llama_file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                       "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                       "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[file_type]
    writer.add_file_type(llama_file_type)
    # Only the llama converter writes the vocabulary size; without a token list it is the one place left for it.
    if arch == "llama" or not has_vocabulary:
        writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if config.sliding_window is not None:
        logger.warning("llama.cpp's %s has no sliding window: it will attend over the whole context, not the "
                       "last %d tokens", arch, config.sliding_window)


# ---------------------------------------------------------------- the vocabulary


def _add_vocabulary(writer, tokenizer, config: ModelConfig) -> None:
    """tokenizer.ggml.* and the chat template from a transformers tokenizer, as convert_hf_to_gguf reads them
    from the same tokenizer's files: saved to a scratch directory for gguf's own readers (SpecialVocab: special
    token ids, add_bos/eos, merges, chat template; LlamaHfVocab: a sentencepiece-style vocabulary)."""
    arch = GGUF_ARCHITECTURE[config.architecture]
    with tempfile.TemporaryDirectory(prefix="danlu-gguf-vocab-") as scratch:
        directory = Path(scratch)
        tokenizer.save_pretrained(str(directory))
        # SpecialVocab falls back to config.json's special token ids, as it finds them in a model directory.
        special_ids = {f"{kind}_token_id": getattr(config, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
        (directory / "config.json").write_text(json.dumps(special_ids), encoding="utf-8")
        sentencepiece = _sentencepiece_vocabulary(tokenizer, directory, config.vocab_size) if arch == "llama" else None
        if sentencepiece is not None:
            tokens, scores, types = sentencepiece
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
        else:
            _check_byte_level_bpe(directory)
            tokens, types = _byte_level_vocabulary(tokenizer, config.vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(directory, load_merges=True)
        if arch == "llama":
            _llama_vocabulary_extras(writer, special, directory, config)
        special.add_to_gguf(writer, quiet=True)


def _sentencepiece_vocabulary(tokenizer, directory: Path, vocab_size: int):
    """(tokens, scores, types) of a sentencepiece tokenizer (Llama 2, Mistral), as convert_hf_to_gguf reads a
    Llama's: from the tokenizer.model the tokenizer was loaded from, else from a sentencepiece-style tokenizer.json
    (BPE with byte fallback) with gguf's LlamaHfVocab. None for any other tokenizer."""
    model_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(model_file, str) and model_file.endswith(".model") and Path(model_file).is_file():
        return _sentencepiece_model_vocabulary(Path(model_file), directory, vocab_size)
    try:
        vocabulary = gguf.LlamaHfVocab(directory)
    except (FileNotFoundError, TypeError, KeyError):
        return None
    logger.warning("no tokenizer.model: the vocabulary is read from tokenizer.json, whose token scores llama.cpp's "
                   "converter leaves at -1000; llama.cpp may split some words differently from this tokenizer")
    tokens, scores, types = [], [], []
    for text, score, token_type in vocabulary.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    return tokens, scores, types


def _sentencepiece_model_vocabulary(model_file: Path, directory: Path, vocab_size: int):
    """Every id's piece, score and type from tokenizer.model, the added tokens of tokenizer_config.json over them
    (score -1000), and the ids past both as unused [PAD<id>] tokens (score -10000)."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(model_file))
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    if processor.vocab_size() > vocab_size:
        logger.warning("%s has %d pieces, more than the model's %d embeddings; the rest are left out",
                       model_file.name, processor.vocab_size(), vocab_size)
    for index in range(min(processor.vocab_size(), vocab_size)):
        tokens[index] = processor.id_to_piece(index)
        scores[index] = processor.get_score(index)
        types[index] = _piece_type(processor, index)
    tokenizer_config = _read_json_if_present(directory / "tokenizer_config.json")
    for index, added in tokenizer_config.get("added_tokens_decoder", {}).items():
        index, token = int(index), added["content"]
        if index >= vocab_size:
            continue
        if added.get("special") or _looks_special(token):
            types[index] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[index] = gguf.TokenType.USER_DEFINED
        tokens[index], scores[index] = token, -1000.0
    return tokens, scores, types


def _piece_type(processor, index: int):
    if processor.is_unknown(index):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(index):
        return gguf.TokenType.CONTROL
    if processor.is_unused(index):
        return gguf.TokenType.UNUSED
    if processor.is_byte(index):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _read_json_if_present(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _check_byte_level_bpe(directory: Path) -> None:
    model = _read_json_if_present(directory / "tokenizer.json").get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"the tokenizer is a {model.get('type', 'slow (no tokenizer.json)')} tokenizer; "
                              f"GGUF is written for byte-level or sentencepiece-style BPE tokenizers only")


def _byte_level_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp's type for it: control for special tokens (and added ones that look
    special, like <|im_start|>), user-defined for other added tokens, normal for the rest, unused for the ids
    beyond the tokenizer (named [PAD<id>])."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise CheckpointError(f"the tokenizer has token id {max(by_id)}, beyond the model's {vocab_size} embeddings")
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            # llama.cpp takes added tokens as normalized already: one the tokenizer does not normalize is stored
            # as a round trip through the tokenizer gives it back.
            if not added_decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[index].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    """Added tokens that some tokenizers leave unmarked but llama.cpp treats as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_tokenizer_name(tokenizer) -> str:
    ids = tokenizer.encode(_PRE_TOKENIZER_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    name = _PRE_TOKENIZER_BY_HASH.get(digest)
    if name is None:
        logger.warning("the tokenizer's pre-tokenizer is not one llama.cpp knows by its hash (%s); written as "
                       "'default': llama.cpp then splits text its own way, which may not be this tokenizer's",
                       digest)
        return "default"
    return name


def _llama_vocabulary_extras(writer, special, directory: Path, config: ModelConfig) -> None:
    """What convert_hf_to_gguf adds for the llama architecture only."""
    tokenizer_config = _read_json_if_present(directory / "tokenizer_config.json")
    if "add_prefix_space" in tokenizer_config:
        writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
    if config.vocab_size == 49152:  # convert_hf_to_gguf's rule for Granite's small models (SmolLM's vocabulary)
        special.add_special_token["bos"] = False
