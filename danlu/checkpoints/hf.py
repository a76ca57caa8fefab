"""Hugging Face checkpoint directories: config.json and (sharded) safetensors or pytorch_model.bin.

The decoder families' parameter names are Hugging Face's, so for them reading and writing only maps
config.json to ModelConfig. BERT (BertModel) names its tensors its own way: `hf_tensor_name` and
`danlu_tensor_name` rename them, both ways, on load and on save.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.models.config import ConfigError, ModelConfig
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import read_json
from danlu.utils.progress import progress

ARCHITECTURE_BY_HF_CLASS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "BertModel": "bert",  # BERT's task models (BertForMaskedLM, ...) are read through model_type: their encoder
}
HF_CLASS_BY_ARCHITECTURE = {v: k for k, v in ARCHITECTURE_BY_HF_CLASS.items()}  # model_type is our name
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
QWEN_WINDOWED = ("qwen2", "qwen3")  # use_sliding_window / sliding_window / max_window_layers
# Heads a reward model's checkpoint carries beside the causal LM's weights (the sequence-classification
# `score`, trl's `v_head`): not part of the decoder, read by danlu.checkpoints.value_head.
VALUE_HEAD_TENSORS = ("score.weight", "v_head.summary.weight", "v_head.summary.bias")
# BERT's hidden_act -> danlu's mlp (gelu_new and gelu_pytorch_tanh are both the tanh approximation).
BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


# ---------------------------------------------------------------- config.json <-> ModelConfig

def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    arch = _architecture(hf, source)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing field(s) {missing}")
    family = _bert_values(hf, source) if arch == "bert" else _decoder_values(arch, hf, source)
    values = dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        name=hf.get("_name_or_path", ""),
    )
    try:
        return ModelConfig(**{**values, **family})
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def _decoder_values(arch: str, hf: dict, source: str) -> dict:
    """Llama, Qwen2, Qwen3, Mistral: pre-norm RMSNorm blocks, SwiGLU, RoPE."""
    theta, rope_scaling = _rope_from_hf(hf)
    return dict(
        num_key_value_heads=hf.get("num_key_value_heads"),
        # Qwen3Config's head_dim defaults to 128 rather than hidden_size // num_attention_heads.
        head_dim=hf.get("head_dim", 128 if arch == "qwen3" else None),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        **_family_switches(arch, hf),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window_from_hf(arch, hf, source),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )


def _bert_values(hf: dict, source: str) -> dict:
    """BertModel: the encoder. Post-norm LayerNorm blocks with biases everywhere, learned absolute positions and
    token types, a LayerNorm on the embeddings, exact GELU; absent fields take BertConfig's defaults."""
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise CheckpointError(f"{source}: position_embedding_type {position_type!r} is not supported; danlu "
                              f"reads BERT with learned absolute positions only ('absolute')")
    act = hf.get("hidden_act", "gelu")
    if act not in BERT_ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for BERT; danlu reads "
                              f"{list(BERT_ACTIVATIONS)}")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError(f"{source}: BERT as a decoder (is_decoder / add_cross_attention) is not "
                              f"supported; danlu reads the encoder")
    return dict(
        causal=False,
        position_embedding_type="absolute",
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        embedding_norm=True,
        norm_position="post",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp=BERT_ACTIVATIONS[act],
        qkv_bias=True, o_bias=True, mlp_bias=True,
        add_pooling_layer=True,  # BertModel's default; read_hf_config looks at the weights
        pad_token_id=hf.get("pad_token_id", 0),
    )


def _architecture(hf: dict, source: str) -> str:
    architectures = hf.get("architectures") or []
    hf_class = architectures[0] if architectures else None
    if hf_class not in ARCHITECTURE_BY_HF_CLASS:
        hf_class = HF_CLASS_BY_ARCHITECTURE.get(hf.get("model_type"), hf_class)
    if hf_class not in ARCHITECTURE_BY_HF_CLASS:
        raise CheckpointError(
            f"{source}: unsupported architecture {architectures or hf.get('model_type')!r}; danlu reads "
            f"{', '.join(ARCHITECTURE_BY_HF_CLASS)}")
    return ARCHITECTURE_BY_HF_CLASS[hf_class]


def _rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
    """rope_theta and rope_scaling from either the new rope_parameters or the legacy fields."""
    rope = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy_scaling.items() if k not in rope})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    return theta, (rope if rope.get("rope_type", "default") != "default" else None)


def _family_switches(arch: str, hf: dict) -> dict:
    """The biases and the q/k norm, which each Hugging Face family fixes or reads its own way."""
    attention_bias = bool(hf.get("attention_bias", False))
    if arch == "qwen2":
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False)
    if arch == "qwen3":
        return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
    if arch == "mistral":
        return dict(qkv_bias=attention_bias, o_bias=False, mlp_bias=False)
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _sliding_window_from_hf(arch: str, hf: dict, source: str) -> Optional[int]:
    if arch == "mistral":
        return hf.get("sliding_window")
    if arch not in QWEN_WINDOWED or not hf.get("use_sliding_window"):
        return None
    # Qwen's layers from max_window_layers on use the window; we support the window on all of them.
    if hf.get("max_window_layers", 0) != 0:
        raise CheckpointError(
            f"{source}: {arch} sliding window on only some layers (max_window_layers="
            f"{hf.get('max_window_layers')}) is not supported; set use_sliding_window false")
    return hf.get("sliding_window")


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    arch = config.architecture
    problems = _unrepresentable(config)
    if problems:
        raise CheckpointError(
            f"this model cannot be written as a Hugging Face {HF_CLASS_BY_ARCHITECTURE.get(arch, arch)}: "
            + "; ".join(problems))
    if arch == "bert":
        return _bert_config_to_hf(config, dtype)
    rope_parameters = {"rope_theta": config.rope_theta, "rope_type": "default", **(config.rope_scaling or {})}
    hf = {
        **_shared_hf_fields(config, dtype),
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if arch == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    elif arch == "qwen3":
        hf.update(attention_bias=config.qkv_bias)
    elif arch == "mistral":
        hf.update(sliding_window=config.sliding_window)
    if arch in QWEN_WINDOWED:
        window = config.sliding_window
        hf.update(use_sliding_window=window is not None, sliding_window=window,
                  max_window_layers=0 if window is not None else config.num_hidden_layers)
    return hf


def _bert_config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        **_shared_hf_fields(config, dtype),
        "hidden_act": "gelu" if config.mlp == "gelu_exact" else "gelu_pytorch_tanh",
        # danlu runs without dropout; these are BERT's, for whoever fine-tunes the checkpoint next.
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute",
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
    }


def _shared_hf_fields(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json fields every family writes alike."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [HF_CLASS_BY_ARCHITECTURE[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# The encoder switches, as every decoder family has them and as BERT has them.
DECODER_SWITCHES = dict(causal=True, position_embedding_type="rope", type_vocab_size=0, embedding_norm=False,
                        norm_position="pre", add_pooling_layer=False)
BERT_SWITCHES = dict(causal=False, position_embedding_type="absolute", embedding_norm=True, norm_position="post",
                     norm="layernorm", qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=False,
                     rope_scaling=None, sliding_window=None)


def _unrepresentable(config: ModelConfig) -> list[str]:
    arch = config.architecture
    if arch not in HF_CLASS_BY_ARCHITECTURE:
        return [f"architecture {arch!r} has no Hugging Face class (use one of {list(HF_CLASS_BY_ARCHITECTURE)})"]
    if arch == "bert":
        return _bert_problems(config)
    problems = _switches_differ(config, DECODER_SWITCHES, f"a {arch} decoder")
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (needs 'rmsnorm')")
    if config.mlp != "swiglu":
        problems.append(f"mlp={config.mlp!r} (needs 'swiglu')")
    if config.qk_norm != (arch == "qwen3"):
        problems.append("only Qwen3 has q/k norms, and it always has them (qk_norm)")
    if arch in ("llama", "qwen3") and config.qkv_bias != config.o_bias:
        problems.append(f"{arch} has one attention_bias for q, k, v and o: qkv_bias must equal o_bias")
    if arch == "llama" and config.sliding_window is not None:
        problems.append("Llama has no sliding window")
    if arch == "llama" and config.hidden_size % config.num_attention_heads:
        problems.append(f"transformers' LlamaConfig refuses hidden_size {config.hidden_size} with "
                        f"{config.num_attention_heads} attention heads (not a multiple), even with head_dim set; "
                        f"Mistral computes the same without biases (architecture='mistral')")
    if arch == "qwen3" and config.mlp_bias:
        problems.append("Qwen3 has no MLP bias")
    if arch == "qwen2" and (not config.qkv_bias or config.o_bias or config.mlp_bias):
        problems.append("Qwen2 has bias on q, k, v only")
    if arch == "mistral" and (config.qkv_bias or config.o_bias or config.mlp_bias):
        problems.append("Mistral has no biases")
    return problems


def _bert_problems(config: ModelConfig) -> list[str]:
    problems = _switches_differ(config, BERT_SWITCHES, "BERT")
    if config.mlp not in ("gelu_exact", "gelu"):
        problems.append(f"mlp={config.mlp!r} (BERT has 'gelu_exact' or 'gelu')")
    if config.type_vocab_size < 1:
        problems.append("type_vocab_size=0 (BertModel always has token type embeddings)")
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append("BERT has no grouped-query attention (num_key_value_heads must equal num_attention_heads)")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"BERT's head_dim is hidden_size // num_attention_heads "
                        f"({config.hidden_size // config.num_attention_heads}), got head_dim={config.head_dim} "
                        f"(when narrowing a config with replace(), pass head_dim=None too)")
    return problems


def _switches_differ(config: ModelConfig, wanted: dict, family: str) -> list[str]:
    return [f"{name}={getattr(config, name)!r} ({family} has {value!r})"
            for name, value in wanted.items() if getattr(config, name) != value]


def read_hf_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    hf = read_json(path, CheckpointError, "a Hugging Face model directory needs config.json")
    config = config_from_hf(hf, str(path))
    if config.architecture == "bert":
        # Whether BertModel has its pooler is a constructor argument, not in config.json: the weights say.
        config = config.replace(add_pooling_layer=_has_pooler(Path(directory)))
    return config


def _has_pooler(directory: Path) -> bool:
    try:
        names = tensor_names(directory)
    except CheckpointError:
        return True  # no weights to look at (a bare config.json): BertModel's default
    return any(danlu_tensor_name(name, "bert") == "pooler.dense.weight" for name in names)


# ---------------------------------------------------------------- tensor names

# danlu's module names (transformer.py) -> BertModel's; "*" stands for the layer index. In a post-norm block
# input_layernorm is the attention sublayer's norm and post_attention_layernorm the MLP's (see Block).
BERT_MODULES = {
    "model.embed_tokens": "embeddings.word_embeddings",
    "model.embed_positions": "embeddings.position_embeddings",
    "model.embed_token_types": "embeddings.token_type_embeddings",
    "model.embed_norm": "embeddings.LayerNorm",
    "model.layers.*.self_attn.q_proj": "encoder.layer.*.attention.self.query",
    "model.layers.*.self_attn.k_proj": "encoder.layer.*.attention.self.key",
    "model.layers.*.self_attn.v_proj": "encoder.layer.*.attention.self.value",
    "model.layers.*.self_attn.o_proj": "encoder.layer.*.attention.output.dense",
    "model.layers.*.input_layernorm": "encoder.layer.*.attention.output.LayerNorm",
    "model.layers.*.mlp.up_proj": "encoder.layer.*.intermediate.dense",
    "model.layers.*.mlp.down_proj": "encoder.layer.*.output.dense",
    "model.layers.*.post_attention_layernorm": "encoder.layer.*.output.LayerNorm",
    "pooler.dense": "pooler.dense",
}
BERT_MODULES_FROM_HF = {hf: ours for ours, hf in BERT_MODULES.items()}
BERT_TASK_PREFIX = "bert."  # where BERT's task models (BertForMaskedLM, ...) keep the encoder


def hf_tensor_name(name: str, architecture: str) -> str:
    """The name Hugging Face's class of `architecture` gives danlu's tensor `name`."""
    if architecture != "bert":
        return name
    renamed = _rename(name, BERT_MODULES)
    if renamed is None:
        raise CheckpointError(f"tensor {name!r} has no place in Hugging Face's BertModel")
    return renamed


def danlu_tensor_name(name: str, architecture: str) -> Optional[str]:
    """danlu's name for a checkpoint's tensor `name`, or None if it is not one of the model's tensors."""
    if architecture != "bert":
        return name
    return _rename(name.removeprefix(BERT_TASK_PREFIX), BERT_MODULES_FROM_HF)


def _rename(name: str, modules: dict[str, str]) -> Optional[str]:
    """Rename the module part of `name` through `modules` (whose "*" is the layer index), keeping the
    parameter's own name (weight, bias)."""
    module, _, parameter = name.rpartition(".")
    parts = module.split(".")
    pattern = ".".join("*" if p.isdigit() else p for p in parts)
    if pattern not in modules:
        return None
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{modules[pattern].replace('*', layer)}.{parameter}"


# ---------------------------------------------------------------- weights

def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from its index when sharded."""
    directory = Path(directory)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid index (needs a 'weight_map'): {e}") from e
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index_path} lists shard(s) that are missing: {', '.join(absent)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory}: no weights found (looked for {SAFETENSORS_INDEX}, {BIN_INDEX}, model.safetensors, "
        f"pytorch_model.bin)")


def iter_tensors(files: Iterable[Path]):
    """Yield (file, name, tensor) from safetensors or weights-only torch files."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        yield path, name, f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for truncated zip archives
                raise CheckpointError(f"{path}: cannot read torch weights file (truncated or corrupt?): {e}") from e
            for name, tensor in state.items():
                yield path, name, tensor


def tensor_names(directory: Path) -> list[str]:
    """The names of the tensors a checkpoint directory holds (safetensors: read from the files' headers)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    names = []
    for path in weight_files(directory):
        if path.suffix != ".safetensors":
            names += [name for _, name, _ in iter_tensors([path])]
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                names += f.keys()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return names


def load_hf_state_dict(directory: Path, expected: dict[str, torch.Size], dtype: torch.dtype,
                       show_progress: bool = False, architecture: str = "llama") -> dict[str, torch.Tensor]:
    """Read every expected tensor (danlu's names), checking names and shapes against the model's. Errors name
    the tensors as the checkpoint does."""
    files = weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    bar = progress(total=len(expected), desc="Loading weights", disable=not show_progress)
    for path, name, tensor in iter_tensors(files):
        ours = danlu_tensor_name(name, architecture)
        if ours not in expected:
            if _not_the_models(name, expected):
                continue
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of this model's architecture)")
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[ours])}")
        state[ours] = tensor.to(dtype)
        bar.update(1)
    bar.close()
    missing = [hf_tensor_name(n, architecture) for n in expected if n not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensor(s) {shown} (searched {', '.join(map(str, files))})")
    return state


def _not_the_models(name: str, expected: dict) -> bool:
    """Tensors a checkpoint may hold beside the model's: RoPE caches, the reward heads (read by
    danlu.checkpoints.value_head), an untied head the model does without, BERT's position_ids buffer (older
    transformers saved it) and the heads of BERT's task models (cls.*: masked LM, next sentence)."""
    return (name.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")) or name in VALUE_HEAD_TENSORS
            or (name == "lm_head.weight" and "lm_head.weight" not in expected) or name.startswith("cls."))


def save_hf_checkpoint(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path,
                       dtype: torch.dtype, max_shard_bytes: int = 2 * 1024**3, tokenizer=None,
                       generation_config: Optional[dict] = None, show_progress: bool = False,
                       extra_config: Optional[dict] = None) -> Path:
    """Write config.json (with `extra_config`'s keys added), (sharded) safetensors with index, tokenizer and
    generation_config.json (a decoder's only). `state` has danlu's names; the files get Hugging Face's.

    The directory appears only when complete: it is written beside the target and renamed into place.
    """
    from safetensors.torch import save_file

    hf_config = {**config_to_hf(config, dtype), **(extra_config or {})}  # raises before anything is written
    state = {hf_tensor_name(k, config.architecture): v for k, v in state.items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    shards = _plan_shards(state, dtype, max_shard_bytes)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        bar = progress(total=len(state), desc="Writing weights", disable=not show_progress)
        weight_map = {}
        for i, names in enumerate(shards):
            file_name = "model.safetensors" if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: state[n].detach().to(dtype).contiguous() for n in names}
            save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
            weight_map.update({n: file_name for n in names})
            bar.update(len(names))
        bar.close()
        if len(shards) > 1:
            total = sum(state[n].numel() * dtype.itemsize for n in state)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        write_hf_config(tmp, hf_config)
        write_generation_config(tmp, config, generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def write_hf_config(directory: Path, hf_config: dict) -> None:
    """config.json: the Hugging Face config dict (config_to_hf's, with any added keys), indented."""
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")


def write_generation_config(directory: Path, config: ModelConfig, generation_config: Optional[dict]) -> None:
    """generation_config.json, a decoder's only: the config's special token ids under `generation_config`."""
    if config.causal:
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "pad_token_id": config.pad_token_id, **(generation_config or {})}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def _plan_shards(state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def writable_family(config: ModelConfig) -> ModelConfig:
    """transformers' LlamaConfig refuses a head count that does not divide hidden_size, even with head_dim set;
    Mistral computes the same as a Llama without biases, so a Llama left with fewer heads (pruned, or a DynaBERT
    sub-network) is labelled Mistral."""
    biased = config.qkv_bias or config.o_bias or config.mlp_bias
    if config.architecture == "llama" and config.hidden_size % config.num_attention_heads and not biased:
        return config.replace(architecture="mistral")
    return config
