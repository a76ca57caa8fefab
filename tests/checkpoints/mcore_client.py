"""megatron-core as the real client of a Megatron checkpoint: load it into mcore's own GPTModel and return its logits.

Importable (the pytest side) and a script (the torchrun side):

    torchrun --nproc-per-node TP tests/checkpoints/mcore_client.py \
        --checkpoint DIR --config CONFIG.json --tokens TOKENS.json --out LOGITS.pt

DIR is Megatron's legacy (non-distributed) layout: `DIR/latest_checkpointed_iteration.txt` holds a number N
(-> `DIR/iter_{N:07d}`) or the word `release` (-> `DIR/release`), and under it each tensor-parallel rank's
`mp_rank_{tp_rank:02d}/model_optim_rng.pt` whose `"model"` entry is that rank's flat state dict in mcore names.
CONFIG.json is a danlu ModelConfig as a dict (`ModelConfig.to_dict()`); TOKENS.json a list of lists of token ids
(no padding). OUT gets the float32 logits [batch, seq, config vocab_size], gathered over the TP ranks and with
the vocabulary padding sliced off.

`--save-random-init` turns the script around for testing the harness itself: it builds a randomly initialised
GPTModel (plus noise, so norms and biases are not the trivial ones and each TP shard differs), writes its state
dict into DIR in the same layout and saves its logits to OUT.

Everything megatron happens in the torchrun subprocess that `run_mcore_client` starts: importing this module in
the pytest process imports neither megatron nor torch.distributed state, and patches nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

SCRIPT = Path(__file__).resolve()


def _mcore_installed() -> bool:
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):  # no `megatron` package at all
        return False


MCORE_AVAILABLE = _mcore_installed()
MCORE_SKIP_REASON = ("megatron-core is not installed: the Megatron checkpoint checks need it as the real client "
                     "(pip install megatron-core)")


def require_mcore() -> None:
    """In a test: skip it, saying why, where megatron-core is absent (pytest.importorskip's role)."""
    if not MCORE_AVAILABLE:
        import pytest

        pytest.skip(MCORE_SKIP_REASON)


# --- pure helpers (no megatron import) -------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's `_vocab_size_with_padding`: round up to a multiple of make_vocab_size_divisible_by * TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def iteration_dir(checkpoint_dir: Path) -> Path:
    """The directory `latest_checkpointed_iteration.txt` names: `release`, or `iter_{N:07d}` for a number N."""
    checkpoint_dir = Path(checkpoint_dir)
    tracker = checkpoint_dir / "latest_checkpointed_iteration.txt"
    text = tracker.read_text().strip()
    if text == "release":
        return checkpoint_dir / "release"
    return checkpoint_dir / f"iter_{int(text):07d}"


def rank_file(checkpoint_dir: Path, tp_rank: int) -> Path:
    return iteration_dir(checkpoint_dir) / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- TransformerConfig from a danlu config --------------------------------------------------------------------

def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def _check_supported(c: dict) -> None:
    problems = []
    if not c.get("causal", True):
        problems.append("causal=False (an encoder has no mcore GPTModel)")
    if c.get("position_embedding_type", "rope") != "rope":
        problems.append(f"position_embedding_type={c['position_embedding_type']!r}")
    if c.get("norm_position", "pre") != "pre":
        problems.append(f"norm_position={c['norm_position']!r}")
    if c.get("sliding_window") is not None:
        problems.append("sliding_window (mcore's local DotProductAttention window differs from Hugging Face's)")
    if c.get("type_vocab_size", 0) or c.get("embedding_norm", False) or c.get("add_pooling_layer", False):
        problems.append("BERT-only fields (type_vocab_size / embedding_norm / add_pooling_layer)")
    # mcore has one switch for every linear bias (add_bias_linear) plus add_qkv_bias for the qkv one only.
    o_bias, mlp_bias, qkv_bias = (bool(c.get(k, False)) for k in ("o_bias", "mlp_bias", "qkv_bias"))
    if o_bias != mlp_bias:
        problems.append(f"o_bias={o_bias} with mlp_bias={mlp_bias} (mcore's add_bias_linear sets both)")
    if o_bias and not qkv_bias:
        problems.append("o_bias without qkv_bias (mcore's add_bias_linear also adds the qkv bias)")
    scaling = c.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            # mcore's RotaryEmbedding._apply_scaling hard-codes these three; only the factor is a parameter.
            fixed = {"low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}
            odd = {k: scaling.get(k) for k, v in fixed.items() if scaling.get(k, v) != v}
            if odd:
                problems.append(f"llama3 rope_scaling with {odd} (mcore fixes {fixed})")
        elif kind not in ("default", "linear"):
            problems.append(f"rope_scaling type {kind!r}")
    if problems:
        raise NotImplementedError("the mcore client cannot express: " + "; ".join(problems))


def transformer_config(config_dict: dict, tp_size: int = 1):
    """megatron.core TransformerConfig for a danlu ModelConfig dict, set for Hugging Face (Llama) math exactly.

    Imports megatron: call it in the torchrun subprocess (or any process that may import megatron)."""
    from megatron.core.transformer import TransformerConfig

    c = dict(config_dict)
    _check_supported(c)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    mlp = c.get("mlp", "swiglu")
    activation = {"swiglu": torch.nn.functional.silu, "gelu": _gelu_tanh,
                  "gelu_exact": torch.nn.functional.gelu}[mlp]
    return TransformerConfig(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=c["intermediate_size"],
        normalization={"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[c.get("norm", "rmsnorm")],
        layernorm_epsilon=c.get("norm_eps", 1e-6),
        qk_layernorm=bool(c.get("qk_norm", False)),
        gated_linear_unit=(mlp == "swiglu"),
        activation_func=activation,
        add_bias_linear=bool(c.get("o_bias", False)),
        add_qkv_bias=bool(c.get("qkv_bias", False)),
        rotary_interleaved=False,  # Hugging Face's rotate_half: the two halves of each head, not even/odd pairs
        # exact inference math: no dropout, fp32 everywhere, no fused CUDA kernels
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        fp16=False,
        bf16=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        # parallelism and initialisation on CPU
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=c.get("initializer_range", 0.02),
    )


def gpt_model_kwargs(config_dict: dict) -> dict:
    """The GPTModel arguments outside TransformerConfig (position embedding and RoPE live there, not in the config:
    GPTModel hands `rotary_base` / `position_embedding_type` from its own arguments to RotaryEmbedding and
    LanguageModelEmbedding, so leaving them at their defaults gives 10000 and a learned absolute table)."""
    c = config_dict
    kwargs = dict(
        max_sequence_length=c.get("max_position_embeddings", 4096),
        share_embeddings_and_output_weights=bool(c.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=c.get("rope_theta", 10000.0),
        rotary_percent=1.0,
        parallel_output=True,  # vocab-parallel logits; gathered by hand (gloo) in _gather_vocab
    )
    scaling = c.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            kwargs["seq_len_interpolation_factor"] = float(scaling["factor"])
        elif kind == "llama3":
            kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return kwargs


def layer_spec(config_dict: dict):
    """mcore's local (no Transformer Engine) GPT layer spec for this config."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    normalization = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[config_dict.get("norm", "rmsnorm")]
    return get_gpt_layer_local_spec(qk_layernorm=bool(config_dict.get("qk_norm", False)),
                                    normalization=normalization)


# --- the torchrun side ------------------------------------------------------------------------------------------

def patch_for_cpu() -> None:
    """What megatron-core's forward needs to run on a CPU-only torch (called in the subprocess only).

    - torch.cuda.current_device: mcore allocates with `device=torch.cuda.current_device()` (the attention score
      buffer, RoPE's inv_freq on first use); "cpu" makes those CPU tensors.
    - the CUDA RNG tracker's fork(): DotProductAttention wraps its (here p=0) dropout in it, and fork() swaps CUDA
      RNG states; a no-op context is exact since no random numbers are drawn.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        yield

    mcore_random.CudaRNGStatesTracker.fork = fork
    tracker_class = type(mcore_random.get_cuda_rng_tracker())
    if tracker_class is not mcore_random.CudaRNGStatesTracker:
        tracker_class.fork = fork


def build_model(config_dict: dict, tp_size: int, vocab_size: int):
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(config_dict, tp_size)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(config_dict), vocab_size=vocab_size,
                     pre_process=True, post_process=True, **gpt_model_kwargs(config_dict))
    return model.eval()


def megatron_lm_args(config, config_dict: dict, padded_vocab: int) -> argparse.Namespace:
    """The model's part of the args Megatron-LM's training saves in a checkpoint (its argument names), taken from
    mcore's TransformerConfig; no config.json goes beside the shards, as with a checkpoint Megatron wrote."""
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        swiglu=config.gated_linear_unit, add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm, position_embedding_type="rope",
        rotary_base=config_dict.get("rope_theta", 10000.0),
        max_position_embeddings=config_dict.get("max_position_embeddings", 4096),
        untie_embeddings_and_output_weights=not config_dict.get("tie_word_embeddings", False),
        tensor_model_parallel_size=config.tensor_model_parallel_size, pipeline_model_parallel_size=1,
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128, use_legacy_models=False,
        transformer_impl="local")


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def load_rank_state_dict(checkpoint_dir: Path, tp_rank: int) -> dict:
    path = rank_file(checkpoint_dir, tp_rank)
    if not path.is_file():
        raise FileNotFoundError(f"no Megatron checkpoint file for TP rank {tp_rank}: {path}")
    # Megatron stores its argparse.Namespace under "args"; allow exactly that class so weights_only=True holds.
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(path, map_location="cpu", weights_only=True)
    if "model" not in saved:
        raise KeyError(f"{path} has no 'model' entry (keys: {sorted(saved)})")
    return saved["model"]


def load_into(model, state_dict: dict) -> None:
    """load_state_dict(strict=True) on every tensor; `_extra_state` entries are dropped first.

    Why `_extra_state` may be absent (or present) in the checkpoint: it is not a weight but a module-private blob.
    mcore's local Column/RowParallelLinear expose one only for compatibility with Transformer Engine's state dicts
    (get_extra_state() returns None, set_extra_state() ignores its argument, and a load pre-hook fills a missing
    one with None), while a TE-spec checkpoint stores fp8 metadata there as io.BytesIO that the local modules would
    ignore anyway. A converter writing weights only is therefore right to leave them out."""
    tensors = {k: v for k, v in state_dict.items() if not _is_extra_state(k)}
    model.load_state_dict(tensors, strict=True)


def model_tensors(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not _is_extra_state(k) and isinstance(v, torch.Tensor)}


def perturb(model, seed: int, tp_rank: int) -> None:
    """Noise on every parameter: norms and biases become nontrivial, and TP shards differ between ranks while
    replicated parameters (norms, row-parallel biases) stay identical on all ranks."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(seed * 1000 + (tp_rank + 1 if sharded else 0))
            param.add_(torch.randn(param.shape, generator=g) * 0.1)


def forward_logits(model, tokens: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(tokens, dtype=torch.long)
    if ids.dim() != 2:
        raise ValueError("tokens must be a list of equal-length lists of token ids")
    batch, seq = ids.shape
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(batch, seq)
    # Causal mask (True = masked), given explicitly: with attention_mask=None mcore's torch softmax builds it with
    # device="cuda" hard-coded (transformer/utils.get_default_causal_mask). Same mask, same math.
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model(ids, position_ids, mask)  # [b, s, padded_vocab / TP]


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--tokens", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=1234, help="torch seed for the (overwritten) initial weights")
    parser.add_argument("--save-random-init", action="store_true",
                        help="write a random GPTModel into --checkpoint instead of loading it (tests the harness)")
    args = parser.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    patch_for_cpu()
    torch.distributed.init_process_group(backend="gloo")
    try:
        tp = torch.distributed.get_world_size()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        config_dict = json.loads(args.config.read_text())
        tokens = json.loads(args.tokens.read_text())
        torch.manual_seed(args.seed)

        if args.save_random_init:
            vocab = padded_vocab_size(config_dict["vocab_size"], tp)
            model = build_model(config_dict, tp, vocab)
            perturb(model, args.seed, tp_rank)
            path = args.checkpoint / "release" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model_tensors(model), "checkpoint_version": 3.0, "iteration": 0,
                        "args": megatron_lm_args(model.config, config_dict, vocab)}, path)
            torch.distributed.barrier()
            if tp_rank == 0:
                (args.checkpoint / "latest_checkpointed_iteration.txt").write_text("release")
        else:
            state_dict = load_rank_state_dict(args.checkpoint, tp_rank)
            embedding = state_dict.get("embedding.word_embeddings.weight")
            if embedding is None:
                raise KeyError("checkpoint has no embedding.word_embeddings.weight")
            vocab = embedding.shape[0] * tp
            if vocab < config_dict["vocab_size"]:
                raise ValueError(f"checkpoint vocabulary {vocab} (= {embedding.shape[0]} x TP {tp}) is smaller than "
                                 f"the config's vocab_size {config_dict['vocab_size']}")
            model = build_model(config_dict, tp, vocab)
            load_into(model, state_dict)

        logits = _gather_vocab(forward_logits(model, tokens))[..., :config_dict["vocab_size"]]
        if torch.distributed.get_rank() == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(logits.float().contiguous(), args.out)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --- the pytest side --------------------------------------------------------------------------------------------

def launch(args: list[str], tp: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run this script under torchrun with `tp` processes; raise with the stderr tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").splitlines()[-60:])
        raise RuntimeError(f"mcore client failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def _write_inputs(tmp_dir: Path, config_dict: dict, tokens) -> tuple[Path, Path]:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path, tokens_path = tmp_dir / "mcore_config.json", tmp_dir / "mcore_tokens.json"
    config_path.write_text(json.dumps(config_dict))
    tokens_path.write_text(json.dumps(torch.as_tensor(tokens).tolist()))
    return config_path, tokens_path


def _run_client(checkpoint_dir, config_dict, tokens, tp: int, tmp_dir, seed: int, *mode: str) -> torch.Tensor:
    """Run this script under torchrun on `checkpoint_dir` (in `mode`); the logits it saved."""
    if not MCORE_AVAILABLE:
        raise RuntimeError(MCORE_SKIP_REASON)
    if hasattr(config_dict, "to_dict"):
        config_dict = config_dict.to_dict()
    with contextlib.ExitStack() as stack:
        work = Path(tmp_dir) if tmp_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config_path, tokens_path = _write_inputs(work, config_dict, tokens)
        out = work / "mcore_logits.pt"
        launch(["--checkpoint", str(checkpoint_dir), "--config", str(config_path), "--tokens", str(tokens_path),
                "--out", str(out), "--seed", str(seed), *mode], tp)
        return torch.load(out, weights_only=True)


def run_mcore_client(checkpoint_dir, config_dict: dict, tokens, tp: int = 1, tmp_dir=None,
                     seed: int = 1234) -> torch.Tensor:
    """Logits [batch, seq, vocab_size] of megatron-core's GPTModel after loading `checkpoint_dir` at TP=`tp`."""
    return _run_client(checkpoint_dir, config_dict, tokens, tp, tmp_dir, seed)


def save_random_mcore_checkpoint(checkpoint_dir, config_dict: dict, tokens, tp: int = 1, tmp_dir=None,
                                 seed: int = 0) -> torch.Tensor:
    """Write a random mcore GPTModel as a Megatron checkpoint at TP=`tp`; return that model's logits."""
    return _run_client(checkpoint_dir, config_dict, tokens, tp, tmp_dir, seed, "--save-random-init")


if __name__ == "__main__":
    main()
