"""Megatron-LM checkpoints: tensor- and pipeline-parallel shards, read and written as Megatron lays them out.

    ROOT/latest_checkpointed_iteration.txt          "release", or the iteration number
    ROOT/release/mp_rank_TT/model_optim_rng.pt       pp = 1 (ROOT/iter_0000100/... for iteration 100)
    ROOT/release/mp_rank_TT_PPP/model_optim_rng.pt   pp > 1
    ROOT/config.json, tokenizer files                the Hugging Face config and tokenizer, as Pai-Megatron-Patch
                                                     copies them beside the shards

Each .pt holds {"args": argparse.Namespace (Megatron's argument names), "checkpoint_version": 3.0,
"iteration": N, "model": the rank's tensors}. Two layouts of "model":

* mcore (megatron.core's GPTModel): flat names, `embedding.word_embeddings.weight`,
  `decoder.layers.J.self_attention.linear_qkv.weight`, `...linear_proj`, `mlp.linear_fc1`, `mlp.linear_fc2`,
  `input_layernorm` / `pre_mlp_layernorm` (with `--te`, Transformer Engine's fused names
  `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`), `decoder.final_layernorm`, `output_layer`;
* legacy (Megatron-LM's `language_model`): nested {"language_model": {"embedding": {"word_embeddings": ...},
  "encoder": {"layers.J.self_attention.query_key_value.weight": ..., "final_layernorm.weight": ...},
  "output_layer": {"weight": ...}}}, with `dense`, `mlp.dense_h_to_4h` and `mlp.dense_4h_to_h`.

The tensors, whichever the layout (each linear's split follows its role in models/roles.py):
* q, k and v are packed per query group, [q heads of group g; k of g; v of g] for g = 0..G-1, and the tensor
  parallel ranks take whole groups;
* gate and up are split per rank *before* they are concatenated: rank r holds [gate_r; up_r] (concatenating
  first and splitting after would give rank 0 all of gate, which breaks training, as seed 001 shows);
* o_proj and down_proj (row parallel) are split on their input features, their biases kept whole on each rank;
* the embedding and the untied head are padded to a multiple of make_vocab_size_divisible_by x tp rows and
  split on the vocabulary; the padding is dropped on the way back. A tied head is written only where Megatron
  keeps a copy: on the last stage when pp > 1;
* J is the layer's number within its pipeline stage (Megatron numbers each stage's layers from 0).
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import config_from_hf, config_to_hf, write_generation_config
from danlu.models.config import ModelConfig
from danlu.models.pipeline_stages import stage_layers
from danlu.models.roles import COLUMN, ROW, role_of
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import read_json
from danlu.utils.progress import progress

LAYOUTS = ("mcore", "legacy")
TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RELEASE = "release"

# danlu's module within a block -> its name within Megatron's layer, per layout. "qkv" and "fc1" are the packed
# q/k/v and gate/up; the norms' TE names are handled in `_layer_tensor_name`.
LAYER_MODULES = {
    "mcore": {"input_layernorm": "input_layernorm", "qkv": "self_attention.linear_qkv",
              "self_attn.o_proj": "self_attention.linear_proj", "self_attn.q_norm": "self_attention.q_layernorm",
              "self_attn.k_norm": "self_attention.k_layernorm", "post_attention_layernorm": "pre_mlp_layernorm",
              "fc1": "mlp.linear_fc1", "mlp.down_proj": "mlp.linear_fc2"},
    "legacy": {"input_layernorm": "input_layernorm", "qkv": "self_attention.query_key_value",
               "self_attn.o_proj": "self_attention.dense", "post_attention_layernorm": "post_attention_layernorm",
               "fc1": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"},
}
# Under Transformer Engine the norms are fused into the linear that follows them.
TE_FUSED_NORMS = {"input_layernorm": "self_attention.linear_qkv", "post_attention_layernorm": "mlp.linear_fc1"}
MCORE_PREFIX, LEGACY_ENCODER = "decoder.layers", "language_model.encoder"


@dataclass(frozen=True)
class MegatronSplit:
    """How a model is cut into Megatron's files."""
    tp: int = 1
    pp: int = 1
    layout: str = "mcore"
    te: bool = False  # Transformer Engine's names for the norms (mcore only)
    first_stage_layers: Optional[int] = None  # Megatron's decoder_first_pipeline_num_layers
    last_stage_layers: Optional[int] = None  # decoder_last_pipeline_num_layers
    vocab_divisible_by: int = 128  # make_vocab_size_divisible_by

    def stages(self, config: ModelConfig) -> list[range]:
        try:
            return stage_layers(config.num_hidden_layers, self.pp, self.first_stage_layers, self.last_stage_layers)
        except ValueError as e:
            raise ValueError(f"--pp: {e}") from None

    def padded_vocab_size(self, vocab_size: int) -> int:
        multiple = self.vocab_divisible_by * self.tp
        return -(-vocab_size // multiple) * multiple

    def check(self, config: ModelConfig) -> None:
        """ValueError naming what does not divide or is not supported, before anything is written."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout: {self.layout!r} is not one of {list(LAYOUTS)}")
        for name in ("tp", "pp", "vocab_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name}: must be a positive integer, got {value!r}")
        if self.te and self.layout != "mcore":
            raise ValueError("--te names Transformer Engine's mcore layers; the legacy layout has no such names")
        if not config.causal or config.position_embedding_type != "rope" or config.norm_position != "pre":
            raise ValueError(f"{config.architecture}: only decoders with rotary embeddings and pre-norm blocks "
                             f"convert to Megatron's GPT model")
        if config.qk_norm and self.layout == "legacy":
            raise ValueError("q/k norms (Qwen3) exist in the mcore layout only; use --layout mcore")
        for what, count in (("attention heads", config.num_attention_heads),
                            ("query groups (num_key_value_heads)", config.num_key_value_heads),
                            ("FFN features (intermediate_size)", config.intermediate_size)):
            if count % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide the model's {count} {what}")
        self.stages(config)


# ---------------------------------------------------------------- tensors: danlu <-> one rank's Megatron names

def to_megatron(state: dict[str, torch.Tensor], config: ModelConfig,
                split: MegatronSplit) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """danlu's (Hugging Face's) state dict -> {(tp_rank, pp_rank): that rank's flat Megatron state}."""
    split.check(config)
    stages = split.stages(config)
    shards = {(t, p): {} for t in range(split.tp) for p in range(split.pp)}
    embedding = _pad_rows(state["model.embed_tokens.weight"], split.padded_vocab_size(config.vocab_size))
    head = embedding if config.tie_word_embeddings else \
        _pad_rows(state["lm_head.weight"], split.padded_vocab_size(config.vocab_size))
    for t, chunk in enumerate(embedding.chunk(split.tp)):
        shards[t, 0][_top_name("embedding", split)] = chunk.clone()
    last = split.pp - 1
    if not config.tie_word_embeddings or split.pp > 1:
        for t, chunk in enumerate(head.chunk(split.tp)):
            shards[t, last][_top_name("output_layer", split)] = chunk.clone()
    for param in _norm_params(config):
        for t in range(split.tp):
            shards[t, last][_top_name(f"final_layernorm.{param}", split)] = state[f"model.norm.{param}"].clone()
    for p, layers in enumerate(stages):
        for local, layer in enumerate(layers):
            for module, param, pieces in _layer_pieces(state, config, layer, split.tp):
                for t, piece in enumerate(pieces):
                    shards[t, p][_layer_tensor_name(local, module, param, split)] = piece
    return shards


def from_megatron(shards: dict[tuple[int, int], dict[str, torch.Tensor]], config: ModelConfig,
                  split: MegatronSplit, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The inverse of `to_megatron`: every rank's flat state -> danlu's state dict. CheckpointError names a
    missing tensor and the rank file it was looked for in."""
    split.check(config)

    def take(t: int, p: int, name: str) -> torch.Tensor:
        try:
            return shards[t, p][name]
        except KeyError:
            raise CheckpointError(f"{source}: {_rank_dir(t, p, split.pp)}/{SHARD_FILE} has no tensor {name!r}; "
                                  f"is it a {split.layout} checkpoint{' with Transformer Engine names' if split.te else ''}"
                                  f" of this model?") from None

    def gathered(p: int, name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([take(t, p, name) for t in range(split.tp)], dim)

    vocab, last = config.vocab_size, split.pp - 1
    state = {"model.embed_tokens.weight": gathered(0, _top_name("embedding", split))[:vocab]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = gathered(last, _top_name("output_layer", split))[:vocab]
    for param in _norm_params(config):
        state[f"model.norm.{param}"] = take(0, last, _top_name(f"final_layernorm.{param}", split))
    for p, layers in enumerate(split.stages(config)):
        for local, layer in enumerate(layers):
            for module, param, role in _layer_modules(config):
                name = _layer_tensor_name(local, module, param, split)
                pieces = [take(t, p, name) for t in range(split.tp)]
                state.update(_unpack(module, param, role, pieces, config, layer, split.tp))
    return state


def _layer_modules(config: ModelConfig) -> Iterator[tuple[str, str, Optional[str]]]:
    """(module, parameter, role) of one block, with q/k/v packed as "qkv" and gate/up as "fc1" (both column
    parallel); the other modules' roles come from models/roles.py (norms have none: whole on every rank)."""
    modules = ["input_layernorm", "qkv", "self_attn.o_proj"] + (["self_attn.q_norm", "self_attn.k_norm"]
                                                                 if config.qk_norm else [])
    modules += ["post_attention_layernorm", "fc1", "mlp.down_proj"]
    biases = {"qkv": config.qkv_bias, "self_attn.o_proj": config.o_bias, "fc1": config.mlp_bias,
              "mlp.down_proj": config.mlp_bias}
    for module in modules:
        role = COLUMN if module in ("qkv", "fc1") else role_of(module)
        if module.endswith(("layernorm", "norm")):
            params = _norm_params(config) if module.endswith("layernorm") else ("weight",)
        else:
            params = ("weight", "bias") if biases[module] else ("weight",)
        for param in params:
            yield module, param, role


def _layer_pieces(state, config: ModelConfig, layer: int, tp: int):
    """(module, parameter, [the piece of each tp rank]) of one block."""
    prefix = f"model.layers.{layer}."
    for module, param, role in _layer_modules(config):
        if module == "qkv":
            q, k, v = (state[f"{prefix}self_attn.{n}_proj.{param}"] for n in "qkv")
            pieces = _pack_qkv(q, k, v, config, tp)
        elif module == "fc1":
            up = state[f"{prefix}mlp.up_proj.{param}"].chunk(tp)
            pieces = up if config.mlp != "swiglu" else \
                [torch.cat([gate, up_r]) for gate, up_r in zip(state[f"{prefix}mlp.gate_proj.{param}"].chunk(tp), up)]
        else:
            tensor = state[f"{prefix}{module}.{param}"]
            split_here = role == ROW and param == "weight"
            pieces = tensor.chunk(tp, dim=1) if split_here else [tensor] * tp
        yield module, param, [piece.clone() for piece in pieces]


def _unpack(module: str, param: str, role: Optional[str], pieces: list[torch.Tensor], config: ModelConfig,
            layer: int, tp: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    if module == "qkv":
        q, k, v = _unpack_qkv(torch.cat(pieces), config)
        return {f"{prefix}self_attn.q_proj.{param}": q, f"{prefix}self_attn.k_proj.{param}": k,
                f"{prefix}self_attn.v_proj.{param}": v}
    if module == "fc1":
        if config.mlp != "swiglu":
            return {f"{prefix}mlp.up_proj.{param}": torch.cat(pieces)}
        gates, ups = zip(*(piece.chunk(2) for piece in pieces))
        return {f"{prefix}mlp.gate_proj.{param}": torch.cat(gates), f"{prefix}mlp.up_proj.{param}": torch.cat(ups)}
    if role == ROW and param == "weight":
        return {f"{prefix}{module}.{param}": torch.cat(pieces, dim=1)}
    return {f"{prefix}{module}.{param}": pieces[0]}


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig,
              tp: int) -> list[torch.Tensor]:
    groups, d = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // groups * d
    packed = torch.cat([q.unflatten(0, (groups, per_group)), k.unflatten(0, (groups, d)),
                        v.unflatten(0, (groups, d))], dim=1)
    return [chunk.flatten(0, 1) for chunk in packed.chunk(tp)]


def _unpack_qkv(packed: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    groups, d = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // groups * d
    q, k, v = packed.unflatten(0, (groups, per_group + 2 * d)).split([per_group, d, d], dim=1)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


def _norm_params(config: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if config.norm == "layernorm" else ("weight",)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    # Megatron's padding rows are never a real token's; zeros keep them out of every logit's way.
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _top_name(what: str, split: MegatronSplit) -> str:
    """The name of the embedding, the head or the final norm's parameter (`final_layernorm.weight`)."""
    if split.layout == "mcore":
        return {"embedding": "embedding.word_embeddings.weight",
                "output_layer": "output_layer.weight"}.get(what, f"decoder.{what}")
    return {"embedding": "language_model.embedding.word_embeddings.weight",
            "output_layer": "language_model.output_layer.weight"}.get(what, f"{LEGACY_ENCODER}.{what}")


def _layer_tensor_name(local: int, module: str, param: str, split: MegatronSplit) -> str:
    if split.te and module in TE_FUSED_NORMS:
        return f"{MCORE_PREFIX}.{local}.{TE_FUSED_NORMS[module]}.layer_norm_{param}"
    prefix = MCORE_PREFIX if split.layout == "mcore" else f"{LEGACY_ENCODER}.layers"
    return f"{prefix}.{local}.{LAYER_MODULES[split.layout][module]}.{param}"


# ---------------------------------------------------------------- legacy nesting

def nest_legacy(flat: dict[str, torch.Tensor]) -> dict:
    """Megatron-LM's legacy model state: language_model -> embedding / encoder / output_layer sub-dicts."""
    nested: dict = {"language_model": {}}
    for name, tensor in flat.items():
        part, rest = name.removeprefix("language_model.").split(".", 1)
        if part == "embedding":  # embedding.word_embeddings.weight -> {"word_embeddings": {"weight": t}}
            module, param = rest.rsplit(".", 1)
            nested["language_model"].setdefault("embedding", {}).setdefault(module, {})[param] = tensor
        elif part == "output_layer":
            nested["language_model"].setdefault("output_layer", {})[rest] = tensor
        else:
            nested["language_model"].setdefault(part, {})[rest] = tensor
    return nested


def flatten_legacy(nested: dict, source: str) -> dict[str, torch.Tensor]:
    try:
        language_model = nested["language_model"]
        flat = {f"language_model.embedding.{module}.{param}": tensor
                for module, params in language_model.get("embedding", {}).items() for param, tensor in params.items()}
        flat.update({f"{LEGACY_ENCODER}.{name}": tensor for name, tensor in language_model.get("encoder", {}).items()})
        flat.update({f"language_model.output_layer.{name}": tensor
                     for name, tensor in language_model.get("output_layer", {}).items()})
    except (KeyError, AttributeError, TypeError):
        raise CheckpointError(f"{source}: 'model' is not Megatron-LM's legacy language_model state "
                              f"(expected language_model -> embedding / encoder / output_layer)") from None
    return flat


# ---------------------------------------------------------------- Megatron's arguments

def megatron_args(config: ModelConfig, split: MegatronSplit, dtype: torch.dtype,
                  iteration: Optional[int]) -> argparse.Namespace:
    """The model's description under Megatron-LM's argument names (what its checkpoints carry as "args")."""
    values = dict(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_key_value_heads != config.num_attention_heads,
        num_query_groups=config.num_key_value_heads, kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        position_embedding_type="rope", rotary_base=config.rope_theta, rotary_percent=1.0,
        rotary_interleaved=False, normalization="RMSNorm" if config.norm == "rmsnorm" else "LayerNorm",
        norm_epsilon=config.norm_eps, swiglu=config.mlp == "swiglu",
        add_bias_linear=config.o_bias or config.mlp_bias, add_qkv_bias=config.qkv_bias,
        qk_layernorm=config.qk_norm, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        window_size=None if config.sliding_window is None else (config.sliding_window - 1, 0),
        vocab_size=config.vocab_size, padded_vocab_size=split.padded_vocab_size(config.vocab_size),
        make_vocab_size_divisible_by=split.vocab_divisible_by,
        tensor_model_parallel_size=split.tp, pipeline_model_parallel_size=split.pp,
        decoder_first_pipeline_num_layers=split.first_stage_layers,
        decoder_last_pipeline_num_layers=split.last_stage_layers,
        use_legacy_models=split.layout == "legacy",
        transformer_impl="transformer_engine" if split.te else "local",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, ckpt_format="torch",
        tokenizer_type="HuggingFaceTokenizer", iteration=iteration or 0,
    )
    return argparse.Namespace(**values)


def split_from_args(args: argparse.Namespace, source: str) -> MegatronSplit:
    layout = "legacy" if getattr(args, "use_legacy_models", False) else "mcore"
    return MegatronSplit(tp=_arg(args, "tensor_model_parallel_size", source),
                         pp=_arg(args, "pipeline_model_parallel_size", source), layout=layout,
                         te=getattr(args, "transformer_impl", "local") == "transformer_engine",
                         first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
                         last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None),
                         vocab_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128))


def config_from_args(args: argparse.Namespace, source: str) -> ModelConfig:
    """A ModelConfig from Megatron's arguments alone, for a checkpoint written without config.json."""
    heads = _arg(args, "num_attention_heads", source)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    window = getattr(args, "window_size", None)
    qkv_bias = getattr(args, "add_qkv_bias", False) or getattr(args, "add_bias_linear", False)
    architecture = "qwen3" if getattr(args, "qk_layernorm", False) else "qwen2" if qkv_bias else \
        "mistral" if window else "llama"
    hidden = _arg(args, "hidden_size", source)
    return ModelConfig(
        vocab_size=getattr(args, "vocab_size", None) or _arg(args, "padded_vocab_size", source),
        hidden_size=hidden, num_hidden_layers=_arg(args, "num_layers", source),
        num_attention_heads=heads, num_key_value_heads=groups or heads,
        head_dim=getattr(args, "kv_channels", None) or hidden // heads,
        intermediate_size=getattr(args, "ffn_hidden_size", None) or 4 * hidden,
        norm="rmsnorm" if getattr(args, "normalization", "LayerNorm") == "RMSNorm" else "layernorm",
        norm_eps=getattr(args, "norm_epsilon", 1e-5), mlp="swiglu" if getattr(args, "swiglu", False) else "gelu",
        qkv_bias=qkv_bias, o_bias=getattr(args, "add_bias_linear", False),
        mlp_bias=getattr(args, "add_bias_linear", False), qk_norm=getattr(args, "qk_layernorm", False),
        rope_theta=float(getattr(args, "rotary_base", 10000)),
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        sliding_window=window[0] + 1 if window else None,
        max_position_embeddings=getattr(args, "max_position_embeddings", None) or 4096,
        architecture=architecture)


def _arg(args: argparse.Namespace, name: str, source: str):
    value = getattr(args, name, None)
    if value is None:
        raise CheckpointError(f"{source}: Megatron's args lack {name!r}, which the model's shape needs")
    return value


# ---------------------------------------------------------------- files

def iteration_dir_name(iteration: Optional[int]) -> str:
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def _rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def is_megatron_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / TRACKER).is_file() or any(path.glob("mp_rank_*")))


def write_megatron(directory: Path, shards: dict[tuple[int, int], dict[str, torch.Tensor]],
                   args: argparse.Namespace, split: MegatronSplit, iteration: Optional[int],
                   show_progress: bool = False) -> None:
    """Write the shards and the tracker into `directory` (a fresh one: the caller makes it appear atomically)."""
    iteration_dir = Path(directory) / iteration_dir_name(iteration)
    bar = progress(total=len(shards), desc="Writing rank files", disable=not show_progress)
    for (t, p), flat in shards.items():
        rank_dir = iteration_dir / _rank_dir(t, p, split.pp)
        rank_dir.mkdir(parents=True)
        model = nest_legacy(flat) if split.layout == "legacy" else flat
        torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0,
                    "model": model}, rank_dir / SHARD_FILE)
        bar.update(1)
    bar.close()
    (Path(directory) / TRACKER).write_text(RELEASE if iteration is None else str(iteration), encoding="utf-8")


def read_tracker(root: Path) -> tuple[Path, Optional[int]]:
    """The iteration directory the tracker names, and its iteration (None for release)."""
    root = Path(root)
    if not (root / TRACKER).is_file():
        if any(root.glob("mp_rank_*")):  # the iteration directory itself
            match = re.fullmatch(r"iter_(\d+)", root.name)
            return root, int(match.group(1)) if match else None
        raise CheckpointError(f"{root}: no {TRACKER}; a Megatron checkpoint directory holds it "
                              f"(or pass the iteration directory, e.g. {root}/release)")
    text = (root / TRACKER).read_text(encoding="utf-8").strip()
    if text == RELEASE:
        iteration = None
    elif text.isdigit():
        iteration = int(text)
    else:
        raise CheckpointError(f"{root / TRACKER}: expected 'release' or an iteration number, got {text!r}")
    iteration_dir = root / iteration_dir_name(iteration)
    if not iteration_dir.is_dir():
        raise CheckpointError(f"{root / TRACKER}: names iteration {text}, but {iteration_dir} does not exist")
    return iteration_dir, iteration


def load_shard(path: Path) -> dict:
    """One rank's file, unpickled with weights_only=True: tensors, containers, numbers and Megatron's
    argparse.Namespace, never code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint's tensor/pipeline split needs this rank's file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values, which "
                              f"loading would have to run as code (torch.load weights_only=True: {e})".split("\n")[0]
                              ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})".split("\n")[0]) from None
    if not isinstance(content, dict) or "model" not in content:
        raise CheckpointError(f"{path}: expected Megatron's dict with a 'model' entry")
    return content


def read_megatron(root: Path, config: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, danlu state dict) of the checkpoint at `root`. The config is `config`, else the config.json
    beside the shards, else Megatron's args; the split is read from the args and the files."""
    iteration_dir, iteration = read_tracker(root)
    pp_in_names = not (iteration_dir / _rank_dir(0, 0, 1)).is_dir()  # mp_rank_00_000 rather than mp_rank_00
    first = load_shard(iteration_dir / _rank_dir(0, 0, 2 if pp_in_names else 1) / SHARD_FILE)
    args = first.get("args")
    source = str(iteration_dir)
    if args is None:
        raise CheckpointError(f"{source}: the shards carry no Megatron 'args'; the split cannot be known")
    split = split_from_args(args, source)
    if config is None:
        config = read_megatron_config(root) if (Path(root) / "config.json").is_file() else \
            config_from_args(args, source)
    shards = {}
    for t in range(split.tp):
        for p in range(split.pp):
            path = iteration_dir / _rank_dir(t, p, split.pp) / SHARD_FILE
            content = first if (t, p) == (0, 0) else load_shard(path)
            _check_iteration(content, iteration, path)
            model = content["model"]
            shards[t, p] = flatten_legacy(model, str(path)) if split.layout == "legacy" else model
    return config, from_megatron(shards, config, split, source)


def _check_iteration(content: dict, iteration: Optional[int], path: Path) -> None:
    stored = content.get("iteration")
    if iteration is not None and stored is not None and stored != iteration:
        raise CheckpointError(f"{path}: holds iteration {stored}, but {TRACKER} names iteration {iteration}")


def save_megatron(state: dict[str, torch.Tensor], config: ModelConfig, out_dir: Path, split: MegatronSplit,
                  dtype: torch.dtype, tokenizer=None, generation_config: Optional[dict] = None,
                  iteration: Optional[int] = None, show_progress: bool = False) -> Path:
    """Write `state` as Megatron's shards, with the Hugging Face config and tokenizer beside them (so the
    checkpoint loads for chat, training and conversion back without a detour). Appears only when complete."""
    hf_config = config_to_hf(config, dtype)  # raises before anything is written
    state = {name: tensor.detach().to(dtype) for name, tensor in state.items()}
    shards = to_megatron(state, config, split)
    args = megatron_args(config, split, dtype, iteration)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_megatron(tmp, shards, args, split, iteration, show_progress)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
        write_generation_config(tmp, config, generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def read_megatron_config(root: Path) -> ModelConfig:
    """The checkpoint's config: its config.json when there is one (exact), else Megatron's args."""
    root = Path(root)
    if (root / "config.json").is_file():
        return config_from_hf(read_json(root / "config.json", CheckpointError), str(root / "config.json"))
    iteration_dir, _ = read_tracker(root)
    first = sorted(iteration_dir.glob(f"mp_rank_*/{SHARD_FILE}"))
    if not first:
        raise CheckpointError(f"{iteration_dir}: no mp_rank_*/{SHARD_FILE}")
    args = load_shard(first[0]).get("args")
    if args is None:
        raise CheckpointError(f"{first[0]}: carries no Megatron 'args', and {root} has no config.json")
    return config_from_args(args, str(first[0]))
