"""Quantized checkpoints as transformers writes them for a model quantized with `TorchAoConfig` (torchao 0.18).

`AutoModelForCausalLM.from_pretrained(directory)` (transformers 5.23 with torchao installed) loads what
`save_torchao_checkpoint` writes, on CPU; `read_torchao_checkpoint` reads such a directory, also one transformers
wrote itself, back into QuantizedWeight values. The directory holds:

- config.json: the model's fields and `quantization_config`, TorchAoConfig.to_dict():
  {"quant_method": "torchao", "quant_type": {"default": <torchao's config_to_dict of the AOBaseConfig>},
   "modules_to_not_convert": ..., "include_input_output_embeddings": false, "untie_embedding_weights": false}
  When the weights are not all of one kind (danlu's int4 body with an int8 head; a GGUF Q4_1 file), the
  AOBaseConfig is a FqnToConfig (torchao 0.18; ModuleFqnToConfig is its old name): {"_default": the most
  common kind's config, <module>: its config for every other module}, serialised by config_to_dict as
  {"_type": "FqnToConfig", "_data": {"fqn_to_config": {...}, "module_fqn_to_config": {the same}, ...}}.
  transformers 5.23 takes it as TorchAoConfig.quant_type (its quantizer and TorchAoQuantize handle FqnToConfig:
  exact parameter, exact module, "re:" patterns, then "_default", for nn.Linear only).
- model.safetensors (or shards and their index), flattened by torchao's `flatten_tensor_state_dict`: a
  quantized `<module>.weight` is stored as its tensor subclass's pieces `<module>._weight_qdata`,
  `<module>._weight_scale`, `<module>._weight_zero_point`; the file's metadata maps every tensor name to JSON
  {"_type": class name, "_data": non-tensor attributes, "_tensor_data_names": pieces} ({"_type": "Tensor"} for a
  plain one) and lists the names under "tensor_names". Nothing is pickled.

QuantizedWeight <-> torchao (w is the dequantized weight):

  int8, symmetric, one group per row   Int8WeightOnlyConfig()       Int8Tensor: qdata = codes, scale [out, 1],
                                                                    zero_point int8 zeros; w = qdata * scale
  int4, asymmetric int8, grouped int8  IntxWeightOnlyConfig(int4 or IntxUnpackedToInt8Tensor: qdata int8 (int4:
                                       int8, PerGroup(g) or         codes - 8, in [-8, 7]), scale and zero_point
                                       PerAxis(0), SYMMETRIC or     [out, groups]; w = (qdata - zero_point) * scale
                                       ASYMMETRIC)

A symmetric weight gets int8 zero zero points, as torchao writes them. An asymmetric one's float zero z (w = q*s + z)
becomes torchao's float zero point -z / s: exact up to float32 rounding (a few ulps of the group's range).

Int4WeightOnlyConfig is not used: with torchao 0.18 none of its packing formats quantizes or runs on CPU (plain and
preshuffled need mslk, tile_packed_to_4d CUDA, plain_int32 XPU or NPU), and the CPU one, the prototype
Int4OpaqueTensor (PrototypeInt4WeightOnlyConfig, `_weight_int4pack_mm_for_cpu`), cannot be saved to safetensors.
IntxUnpackedToInt8Tensor keeps one int4 code per byte and its linear dequantizes, then runs F.linear.

A quantized head of a tied model (tie_word_embeddings, lm_head a QuantizedWeight) is written untied, as
torchao's recipes do it (untie by hand, then quantize with modules_to_not_convert=[]). transformers 5.23 itself
cannot: a tied head is never loaded, so never quantized, and untie_embedding_weights acts only when the input
embedding is quantized too (and loading then fails in tie_weights). So config.json has tie_word_embeddings
false, model.embed_tokens.weight is the float embedding, lm_head.weight the quantized head, and
modules_to_not_convert is [] (None would skip the head).

torchao's tensors have no shorter last group: block_size [1, g] must divide the weight's in_features, and the
weight's shape must be the Linear's (a weight padded with extra input columns loads, and its forward fails).

Writing needs torchao (its tensor classes and flattening); reading needs only safetensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import (config_from_hf, config_to_hf, danlu_tensor_name, hf_tensor_name, weight_files,
                                  write_generation_config, write_hf_config)
from danlu.models.config import ModelConfig
from danlu.quantization.weights import INT4_OFFSET, QuantizedWeight
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import read_json

QUANT_METHOD = "torchao"
INT8_ACTIVATIONS_FIELD = "int8_activations"  # a danlu key of config.json (see reads_int8_activations)
WEIGHTS_FILE = "model.safetensors"
INT8_TENSOR = "Int8Tensor"
INTX_TENSOR = "IntxUnpackedToInt8Tensor"
READABLE_CONFIGS = ("Int8WeightOnlyConfig", "IntxWeightOnlyConfig")
PER_MODULE_CONFIGS = ("FqnToConfig", "ModuleFqnToConfig")  # ModuleFqnToConfig: its name before torchao 0.14
DEFAULT_KEY = "_default"
HEAD = "lm_head.weight"
BITS_BY_TARGET_DTYPE = {"int4": 4, "int8": 8}
PIECES = {"qdata", "scale", "zero_point"}  # any other piece (act_pre_scale, ...) changes what the layer computes

StateDict = dict[str, Union[torch.Tensor, QuantizedWeight]]


# ---------------------------------------------------------------- writing

def save_torchao_checkpoint(state: StateDict, config: ModelConfig, out_dir: Path, dtype: torch.dtype,
                            tokenizer=None, generation_config: Optional[dict] = None,
                            extra_config: Optional[dict] = None) -> Path:
    """Write `state` (danlu's names; QuantizedWeight for the quantized linears, tensors for the rest, cast to
    `dtype`) as transformers' torchao checkpoint: config.json with quantization_config, one model.safetensors
    (transformers' own shard size is 50 GB), generation_config.json and the tokenizer.

    Weights of several kinds (bits, symmetry, group size) get a per-module FqnToConfig; a quantized head of a
    tied model is written untied. Every in_features must be a multiple of its weight's group size (torchao has
    no shorter last group). The directory appears only when complete.
    """
    from safetensors.torch import save_file

    _require_torchao()
    config = untied_for_quantized_head(state, config)
    architecture = config.architecture
    quantized = {hf_tensor_name(name, architecture): w for name, w in state.items() if isinstance(w, QuantizedWeight)}
    quant_type = torchao_quant_type(quantized)
    hf_config = {**config_to_hf(config, dtype),
                 "quantization_config": quantization_config_dict(quant_type, head_quantized=HEAD in quantized),
                 **(extra_config or {})}
    tensors, metadata = flatten_for_torchao(state, config, dtype)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        write_hf_config(tmp, hf_config)
        write_generation_config(tmp, config, generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def reads_int8_activations(directory: Path) -> bool:
    """Whether config.json asks danlu to quantize activations too (`danlu quantize --int8-activations`: the weights
    were smoothed for it; transformers ignores the key and computes weight-only on the same weights)."""
    path = Path(directory) / "config.json"
    value = read_json(path, CheckpointError).get(INT8_ACTIVATIONS_FIELD, False)
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: {INT8_ACTIVATIONS_FIELD!r} must be true or false, got {value!r}")
    return value


def _require_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        raise CheckpointError("writing a torchao checkpoint needs torchao (pip install torchao==0.18.0)")


def untied_for_quantized_head(state: StateDict, config: ModelConfig) -> ModelConfig:
    """`config`, untied (tie_word_embeddings false) when its head is tied and quantized: the float embedding and
    the quantized head are then two tensors."""
    if not (config.tie_word_embeddings and isinstance(state.get(HEAD), QuantizedWeight)):
        return config
    return dataclasses.replace(config, tie_word_embeddings=False)


def torchao_quant_type(quantized: dict[str, QuantizedWeight]):
    """The torchao AOBaseConfig that would have produced `quantized` (Hugging Face names): one config when all
    weights are of one kind, else a FqnToConfig {"_default": the most common kind's, <module>: the others'}."""
    if not quantized:
        raise CheckpointError("no quantized weight to write: a torchao checkpoint needs at least one "
                              "QuantizedWeight (save a float model with save_hf_checkpoint)")
    for name, w in quantized.items():
        _check_storable(name, w)
    kinds = {name: _kind(w) for name, w in quantized.items()}
    counts = Counter(kinds.values())
    if len(counts) == 1:
        return torchao_config_for(next(iter(quantized.values())))
    from torchao.quantization import FqnToConfig

    default = max(counts, key=counts.get)  # the first of the most common kinds (Counter keeps insertion order)
    configs = {DEFAULT_KEY: _config_of_kind(default)}
    configs.update({name.removesuffix(".weight"): _config_of_kind(kind)
                    for name, kind in kinds.items() if kind != default})
    with warnings.catch_warnings():  # torchao 0.18 warns that "_default" is deprecated; transformers 5.23 needs it
        warnings.filterwarnings("ignore", message="Config Deprecation: _default")
        return FqnToConfig(configs)


def torchao_config_for(weight: QuantizedWeight):
    """The torchao AOBaseConfig that would have produced `weight` (see the module's table)."""
    return _config_of_kind(_kind(weight))


def _kind(weight: QuantizedWeight) -> tuple[int, bool, Optional[int]]:
    """(bits, symmetric, group size or None for one group per row): what one torchao config describes."""
    per_row = weight.group_size == weight.in_features
    return weight.bits, weight.symmetric, None if per_row else weight.group_size


def _config_of_kind(kind: tuple[int, bool, Optional[int]]):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

    bits, symmetric, group_size = kind
    if bits == 8 and symmetric and group_size is None:
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4 if bits == 4 else torch.int8,
        granularity=PerAxis(0) if group_size is None else PerGroup(group_size),
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
        scale_dtype=torch.float32,
    )


def _check_storable(name: str, weight: QuantizedWeight) -> None:
    """torchao's block_size [1, g] must divide in_features, and the weight must keep the Linear's shape."""
    if not name.endswith(".weight"):
        raise CheckpointError(f"{name}: a torchao checkpoint quantizes Linear weights only (<module>.weight)")
    if weight.in_features % weight.group_size:
        fits = [g for g in (2 ** i for i in range(3, 12)) if g < weight.in_features and weight.in_features % g == 0]
        raise CheckpointError(
            f"{name}: in_features {weight.in_features} is not a multiple of the group size {weight.group_size}; "
            f"torchao's tensors have no shorter last group (block_size must divide in_features, and a weight "
            f"padded with extra input columns no longer fits the Linear). Group sizes that divide "
            f"{weight.in_features}: {', '.join(map(str, fits)) or 'no power of two'}, or one group per row")


def quantization_config_dict(quant_type, head_quantized: bool = False) -> dict:
    """config.json's quantization_config, as transformers writes it for TorchAoConfig(quant_type) (with
    modules_to_not_convert=[] when lm_head is quantized: None means transformers' default skips, the head)."""
    from transformers import TorchAoConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Config Deprecation: _default")
        config = TorchAoConfig(quant_type, modules_to_not_convert=[] if head_quantized else None)
        return json.loads(config.to_json_string(use_diff=False))


def torchao_weight(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The torchao tensor subclass holding `weight`'s codes, scales and zeros as they are (no re-quantization),
    the one its kind's config gives (torchao_config_for); `dtype` is what it dequantizes to, the model's dtype."""
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor

    scale = weight.scales.float().contiguous()
    block_size = [1, weight.group_size]
    integer_zeros = torch.zeros_like(scale, dtype=torch.int8)
    if _kind(weight) == (8, True, None):  # Int8WeightOnlyConfig
        return Int8Tensor(weight.codes.to(torch.int8).contiguous(), scale, block_size, dtype,
                          zero_point=integer_zeros)
    if weight.bits == 4:
        qdata, target_dtype = (weight.codes.to(torch.int16) - INT4_OFFSET).to(torch.int8), torch.int4
    else:
        qdata, target_dtype = weight.codes.to(torch.int8), torch.int8
    # torchao: w = (q - zero_point) * scale; ours: w = q * scale + zero
    zero_point = integer_zeros if weight.symmetric else (-weight.zeros.float() / scale).contiguous()
    return IntxUnpackedToInt8Tensor(qdata.contiguous(), scale, zero_point, target_dtype, block_size, dtype, None)


def flatten_for_torchao(state: StateDict, config: ModelConfig,
                        dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors' tensors and metadata for `state`, flattened by torchao's own function (as transformers'
    TorchAoHfQuantizer.get_state_dict_and_metadata does). A tied head (float) is left out, stored once as the
    embedding; `config` must be untied (untied_for_quantized_head) when the head is quantized."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    subclasses = {}
    for name, value in state.items():
        if config.tie_word_embeddings and name == HEAD:
            if isinstance(value, QuantizedWeight):
                raise CheckpointError("lm_head.weight is quantized but the config ties it to the embeddings; "
                                      "untie it first (untied_for_quantized_head)")
            continue
        if isinstance(value, QuantizedWeight):
            _check_storable(name, value)
            value = torchao_weight(value, dtype)
        else:
            value = value.detach().to(dtype).contiguous()
        subclasses[hf_tensor_name(name, config.architecture)] = value
    tensors, metadata = flatten_tensor_state_dict(subclasses)
    metadata["format"] = "pt"
    return {name: tensor.contiguous() for name, tensor in tensors.items()}, metadata


# ---------------------------------------------------------------- reading

def is_torchao_checkpoint(directory: Path) -> bool:
    """Whether `directory`'s config.json says its weights are quantized with torchao."""
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = hf.get("quantization_config") if isinstance(hf, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def read_torchao_checkpoint(directory: Path) -> StateDict:
    """The weights of a torchao checkpoint directory under danlu's names: QuantizedWeight for the quantized ones,
    tensors as stored for the rest. Only safetensors files are read (their JSON metadata, never a pickle)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    hf = read_json(config_path, CheckpointError, "a Hugging Face model directory needs config.json")
    check_quantization_config(hf.get("quantization_config"), str(config_path))
    config = config_from_hf(hf, str(config_path))
    files = weight_files(directory)
    pickled = [str(path) for path in files if path.suffix != ".safetensors"]
    if pickled:
        raise CheckpointError(f"{', '.join(pickled)}: torchao weights in a pickled torch file; danlu reads torchao "
                              f"checkpoints from safetensors only (transformers writes them so)")
    # transformers lists a tied head in the metadata (it flattens model.state_dict()) but stores it once, as the
    # embedding: it is not one of a tied model's tensors
    tied = frozenset({HEAD} if config.tie_word_embeddings else ())
    state = _read_flattened(files, tied)
    return {danlu_tensor_name(name, config.architecture) or name: value for name, value in state.items()}


def check_quantization_config(quantization, source: str) -> None:
    """Refuse (CheckpointError naming `source`) a quantization_config danlu cannot read: one torchao config, or a
    FqnToConfig (ModuleFqnToConfig) whose every module's config is one danlu reads (or None: left float)."""
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{source}: no quantization_config; not a torchao checkpoint")
    method = quantization.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quantization_config.quant_method is {method!r}; danlu reads quantized "
                              f"checkpoints of quant_method {QUANT_METHOD!r} only")
    quant_type = quantization.get("quant_type")
    config = quant_type.get("default") if isinstance(quant_type, dict) and len(quant_type) == 1 else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: quantization_config.quant_type is {quant_type!r}; expected "
                              f"{{'default': <a torchao config>}} as transformers writes it")
    if config.get("_type") not in PER_MODULE_CONFIGS:
        _check_config(config, source, "")
        return
    values = config.get("_data") or {}
    per_module = values.get("fqn_to_config") or values.get("module_fqn_to_config")
    if not isinstance(per_module, dict) or not per_module:
        raise CheckpointError(f"{source}: {config['_type']} maps no module to a config")
    for module, module_config in per_module.items():
        if module_config is not None:
            _check_config(module_config, source, f" (for {module!r})")


def _check_config(config, source: str, where: str) -> None:
    """Refuse one torchao config danlu cannot read; `where` names its module in a per-module config."""
    name = config.get("_type") if isinstance(config, dict) else None
    values = (config.get("_data") if isinstance(config, dict) else None) or {}
    if name not in READABLE_CONFIGS:
        raise CheckpointError(f"{source}: torchao config {name!r}{where} is not one danlu reads "
                              f"({', '.join(READABLE_CONFIGS)} with int4 or int8 weights, or "
                              f"{PER_MODULE_CONFIGS[0]} of them)")
    if name == "IntxWeightOnlyConfig":
        weight_dtype = (values.get("weight_dtype") or {}).get("_data")
        packing = (values.get("intx_packing_format") or {}).get("_data", "UNPACKED_TO_INT8")
        if weight_dtype not in BITS_BY_TARGET_DTYPE or packing != "UNPACKED_TO_INT8":
            raise CheckpointError(f"{source}: IntxWeightOnlyConfig{where} with weight_dtype {weight_dtype!r} and "
                                  f"intx_packing_format {packing!r}; danlu reads int4 and int8 UNPACKED_TO_INT8")


def _read_flattened(files: list[Path], tied: frozenset[str] = frozenset()) -> StateDict:
    """Rebuild each tensor named in the files' torchao metadata from its pieces, wherever the shards put them;
    a plain tensor of `tied` (the tied head) that no file holds is left out."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    with contextlib.ExitStack() as stack:
        metadata, file_of = {}, {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
            metadata.update(handle.metadata() or {})
            file_of.update({key: (path, handle) for key in handle.keys()})
        names = _tensor_names(metadata, files)
        state, used = {}, set()
        for name in names:
            entry = _metadata_entry(metadata, name, files)
            if entry.get("_type") == "Tensor":
                if name in tied and name not in file_of:
                    continue
                keys = {name: name}
            else:
                module, _, parameter = name.rpartition(".")
                keys = {piece: f"{module}._{parameter}_{piece}" for piece in entry.get("_tensor_data_names", [])}
            absent = [key for key in keys.values() if key not in file_of]
            if absent or not keys:
                raise CheckpointError(f"{_files_text(files)}: tensor {name!r} lacks {absent or 'its pieces'}")
            path = file_of[next(iter(keys.values()))][0]
            pieces = {piece: file_of[key][1].get_tensor(key) for piece, key in keys.items()}
            used.update(keys.values())
            state[name] = pieces[name] if entry.get("_type") == "Tensor" else _quantized(entry, pieces, name, path)
        unexpected = sorted(set(file_of) - used)
        if unexpected:
            raise CheckpointError(f"{file_of[unexpected[0]][0]}: tensor {unexpected[0]!r} is not in the torchao "
                                  f"metadata's tensor_names")
    return state


def _files_text(files: list[Path]) -> str:
    return ", ".join(map(str, files))


def _tensor_names(metadata: dict, files: list[Path]) -> list[str]:
    try:
        names = json.loads(metadata["tensor_names"])
    except (KeyError, TypeError, ValueError):
        names = None
    if not isinstance(names, list):
        raise CheckpointError(f"{_files_text(files)}: no torchao metadata (a JSON list 'tensor_names' in the "
                              f"safetensors header); not written by transformers' torchao quantizer")
    return names


def _metadata_entry(metadata: dict, name: str, files: list[Path]) -> dict:
    try:
        entry = json.loads(metadata[name])
    except (KeyError, TypeError, ValueError):
        entry = None
    if not isinstance(entry, dict):
        raise CheckpointError(f"{_files_text(files)}: tensor {name!r} has no valid torchao metadata entry")
    return entry


def _quantized(entry: dict, pieces: dict[str, torch.Tensor], name: str, path: Path) -> QuantizedWeight:
    """A QuantizedWeight from an Int8Tensor's or an IntxUnpackedToInt8Tensor's pieces and attributes."""
    kind, attributes = entry.get("_type"), entry.get("_data") or {}
    if kind not in (INT8_TENSOR, INTX_TENSOR):
        raise CheckpointError(f"{path}: tensor {name!r} is a torchao {kind}, which danlu cannot read (it reads "
                              f"{INT8_TENSOR} and {INTX_TENSOR})")
    if set(pieces) - PIECES or attributes.get("act_quant_kwargs") or attributes.get("activation_quantization"):
        raise CheckpointError(f"{path}: tensor {name!r} ({kind}) quantizes or scales the activations too "
                              f"({sorted(set(pieces) - PIECES) or 'activation quantization'}); danlu reads "
                              f"weight-only quantization")
    if kind == INT8_TENSOR:
        bits = 8
    else:
        target = (attributes.get("target_dtype") or {}).get("_data")
        if target not in BITS_BY_TARGET_DTYPE:
            raise CheckpointError(f"{path}: tensor {name!r} has target_dtype {target!r}; danlu reads int4 and int8")
        bits = BITS_BY_TARGET_DTYPE[target]
    try:
        return _weight_from_pieces(pieces, attributes.get("block_size"), bits)
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} ({kind}): {e}") from e


def _weight_from_pieces(pieces: dict[str, torch.Tensor], block_size, bits: int) -> QuantizedWeight:
    qdata, scale, zero_point = pieces["qdata"], pieces["scale"], pieces.get("zero_point")
    if qdata.dim() != 2 or qdata.dtype != torch.int8:
        raise ValueError(f"qdata {qdata.dtype} {tuple(qdata.shape)}; expected 2-D int8")
    out, in_features = qdata.shape
    if not (isinstance(block_size, list) and len(block_size) == 2 and block_size[0] in (1, out)
            and block_size[1] > 0 and in_features % block_size[1] == 0):
        raise ValueError(f"block_size {block_size!r} is not [1, group] nor per tensor for shape {[out, in_features]}")
    group_size = block_size[1]
    rows = 1 if block_size[0] == out else out  # per tensor: one scale shared by every row
    scales = scale.float().reshape(rows, in_features // group_size).expand(out, -1).contiguous()
    zeros = None
    if zero_point is not None and bool(zero_point.ne(0).any()):
        zero_point = zero_point.float().reshape(rows, -1).expand(out, -1)
        zeros = (-zero_point * scales).contiguous()
    if bits == 4:
        low, high = qdata.aminmax()
        if int(low) < -INT4_OFFSET or int(high) > 15 - INT4_OFFSET:
            raise ValueError("int4 qdata outside [-8, 7]")
        codes = (qdata + INT4_OFFSET).view(torch.uint8)  # in [0, 15]: no int8 overflow
    else:
        codes = qdata
    return QuantizedWeight(codes, scales, zeros, bits, group_size, in_features)
