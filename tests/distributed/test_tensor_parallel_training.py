"""Tensor parallel (tp) in `danlu train`, in real processes: `torchrun --nproc_per_node N --standalone -m danlu
train ... --parallel tp=2` on gloo, compared step by step with one process. Tiny random Llama (4 query heads,
2 key/value heads, MLP width 128: tp=2 divides them), byte tokenizer, float32.

Tensor parallel does not split the data: the ranks of one tp group read the same examples, so `tp=2` is compared
with one process of the same per-device batch, and `dp=2,tp=2` (4 processes) with one process of twice it.
The tiny model's vocabulary (259) is odd, so under tp=2 its embedding and head stay whole on every rank; a
260-token copy of it checks the vocabulary-parallel embedding and head.

Tolerance: test_data_parallel's (losses relative 1e-5 over 10 steps, weights WEIGHT_TOL). Measured: losses
9e-8 to 1.8e-7 relative in every layout; weights 1.5e-8 (tp=2, SGD), 2.2e-8 (vocabulary-parallel, SGD),
3.7e-7 (LoRA adapter, AdamW), 1.9e-6 (dp=2,tp=2 and fsdp=2,tp=2, AdamW); a resume 0.
"""
import json

import pytest
from safetensors.torch import load_file

from danlu.distributed.layout import ParallelLayout, resolve_layout
from danlu.distributed.parallelize import check_layout, vocab_parallel
from danlu.models.presets import get_preset
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.train import train
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model
from tests.distributed.test_data_parallel import (assert_resume_continues, assert_same_curve, assert_same_weights,
                                                  logged_losses, settings, torchrun)


def tiny_model(directory, vocab_size=None):
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return save_hf_model(model, directory, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def even_vocab_model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model260"), vocab_size=260)


def one_process(model_dir, out, **overrides) -> None:
    train(TrainArguments(**settings(model_dir, out, **overrides)))


# ---------------------------------------------------------------- parity with one process


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_tp2_full_finetuning_equals_one_process_with_the_same_batch(model_dir, tmp_path, optim):
    """AdamW: the curves only. Its update divides by sqrt(v): the head's rows of tokens the batches never hold
    get gradients near its eps (~1e-9), whose rounding (tp sums in another order) it turns into updates of the
    learning rate's size (measured: 1.2e-5 on lm_head after 10 steps, beyond WEIGHT_TOL); so the weights are
    compared under SGD (measured: 1.5e-8)."""
    run = dict(optim=optim, learning_rate=0.1 if optim == "sgd" else 1e-3)
    one_process(model_dir, tmp_path / "single", **run)
    torchrun(settings(model_dir, tmp_path / "tp2", parallel="tp=2", **run))
    assert_same_curve(logged_losses(tmp_path / "tp2"), logged_losses(tmp_path / "single"))
    if optim == "sgd":
        assert_same_weights(tmp_path / "tp2", tmp_path / "single", "model.safetensors")
    assert json.loads((tmp_path / "tp2" / "config.json").read_text()) == \
        json.loads((tmp_path / "single" / "config.json").read_text())


def test_tp2_with_a_vocabulary_parallel_embedding_and_head_equals_one_process(even_vocab_model_dir, tmp_path):
    run = dict(optim="sgd", learning_rate=0.1)
    one_process(even_vocab_model_dir, tmp_path / "single", **run)
    torchrun(settings(even_vocab_model_dir, tmp_path / "tp2", parallel="tp=2", **run))
    assert_same_curve(logged_losses(tmp_path / "tp2"), logged_losses(tmp_path / "single"))
    assert_same_weights(tmp_path / "tp2", tmp_path / "single", "model.safetensors")


def test_tp2_lora_equals_one_process_with_the_same_batch(model_dir, tmp_path):
    lora = dict(finetuning_type="lora", lora_rank=4, learning_rate=5e-3)
    one_process(model_dir, tmp_path / "single", **lora)
    torchrun(settings(model_dir, tmp_path / "tp2", parallel="tp=2", **lora))
    assert_same_curve(logged_losses(tmp_path / "tp2"), logged_losses(tmp_path / "single"))
    assert_same_weights(tmp_path / "tp2", tmp_path / "single", "adapter_model.safetensors")


@pytest.mark.parametrize("parallel", ["dp=2,tp=2", "fsdp=2,tp=2"])
def test_data_and_tensor_parallel_on_4_processes_equal_one_process_with_twice_the_batch(model_dir, tmp_path,
                                                                                       parallel):
    """Each tp pair reads its own half of the global batch (per-device 2 x dp or fsdp 2 = 4 examples)."""
    one_process(model_dir, tmp_path / "single", per_device_train_batch_size=4)
    done = torchrun(settings(model_dir, tmp_path / "run", per_device_train_batch_size=2, parallel=parallel), nproc=4)
    assert f"parallel layout {resolve_layout(parallel, None, 4)} over 4 processes" in done.stderr
    assert_same_curve(logged_losses(tmp_path / "run"), logged_losses(tmp_path / "single"))
    assert_same_weights(tmp_path / "run", tmp_path / "single", "model.safetensors")


# ---------------------------------------------------------------- checkpoints


def test_tp2_resume_at_the_same_layout_continues_the_same_curve(model_dir, tmp_path):
    """Checkpoints hold whole tensors (gathered from the tp shards to rank 0), as one process writes them."""
    straight = assert_resume_continues(model_dir, tmp_path, parallel="tp=2")
    saved = load_file(str(straight / "checkpoint-5" / "trainable.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # whole, not a half


# ---------------------------------------------------------------- bad input, before any work


def as_rank_0_of(monkeypatch, world_size: int) -> None:
    """train() in this process as rank 0 of a torchrun job: it stops before joining the process group."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_tp_not_dividing_the_heads_is_refused_naming_the_sizes(model_dir, tmp_path, monkeypatch):
    as_rank_0_of(monkeypatch, 4)
    out = tmp_path / "run"
    with pytest.raises(ArgumentError, match=r"parallel dp=1,fsdp=1,tp=4,pp=1: .*tp=4 does not divide "
                                            r"num_key_value_heads=2"):
        train(TrainArguments(**settings(model_dir, out, parallel="tp=4")))
    assert not out.exists()


def test_tp_with_quantized_base_weights_is_refused_before_loading(model_dir, tmp_path, monkeypatch):
    as_rank_0_of(monkeypatch, 2)
    with pytest.raises(ArgumentError, match=r"parallel dp=1,fsdp=1,tp=2,pp=1: tensor and pipeline parallel do not "
                                            r"take quantized base weights yet \(quantization_bit=4\)"):
        train(TrainArguments(**settings(model_dir, tmp_path / "run", parallel="tp=2", finetuning_type="lora",
                                        quantization_bit=4)))


def test_an_odd_vocabulary_stays_whole_but_the_heads_must_divide(tmp_path):
    config = get_preset("tiny-llama")
    assert vocab_parallel(config, 2) and not vocab_parallel(config.replace(vocab_size=259), 2)
    check_layout(config.replace(vocab_size=259), ParallelLayout(tp=2))
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=4, num_key_value_heads=2, "
                                         "intermediate_size=128"):
        check_layout(config.replace(vocab_size=258), ParallelLayout(tp=3))

