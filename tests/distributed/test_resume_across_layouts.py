"""A run saved in one parallel layout resumes in another and continues the curve it would have had without
stopping (issue 13). Checkpoints hold whole tensors (gathered from the dp/fsdp/tp shards to rank 0), so any
layout of the same global batch (per_device_train_batch_size x dp x fsdp; tp reads one device batch) reads them.

Each case: 10 steps of layout A saving checkpoint-5; a run in layout B resumes from checkpoint-5, in a directory
holding what a run stopped after step 5 leaves (that checkpoint and the log of steps 1-5, to which the resumed
run appends steps 6-10); compared with one process of the same global batch running 10 steps uninterrupted
(test_data_parallel's: equal to the dp/fsdp/tp runs of that batch within its tolerances): the 10 logged losses
and learning rates, the final weights, and checkpoint-10's weights and optimizer state (Adam's moments and step:
a resume that lost them, or the scheduler's position, would not match).

Tolerance: test_data_parallel's (losses relative 1e-5, weights WEIGHT_TOL; the optimizer's moments WEIGHT_TOL
relative to each tensor's largest value). Measured: losses 9e-8 to 1.9e-7 relative; final weights 7.5e-9 (one
process -> fsdp=2), 2.4e-7 (LoRA dp=2 -> fsdp=2), 6.3e-7 (tp=2 -> one process), 1.1e-6 (dp=2 -> one process,
fsdp=2 -> tp=2); Adam's moments 2.6e-7 to 2.7e-6 relative. A resume that drops the optimizer state (Adam
restarting at step 0) is 1e-2 off the curve, one that drops the scheduler's 1.6e-2.

tp=2 -> one process runs AdamW with eps 1e-6 (and its reference too): with 1e-8, one lm_head element whose
gradient at step 1 is near eps (rounded otherwise under tp) moves by another 1.2e-5 in the tp=2 steps, as in 10
tp=2 steps uninterrupted (test_tensor_parallel_training), beyond WEIGHT_TOL; a larger eps keeps Adam's
state to carry over without amplifying that rounding.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.training.arguments import TrainArguments
from danlu.training.train import train
from tests.distributed.test_data_parallel import (WEIGHT_TOL, assert_same_curve, assert_same_weights,
                                                  logged_losses, settings, single_process, torchrun)
from tests.distributed.test_tensor_parallel_training import tiny_model

SAVED = dict(save_steps=5)  # 10 steps, checkpoint-5 and checkpoint-10
TP_ADAM = dict(adam_epsilon=1e-6)
LORA = dict(finetuning_type="lora", lora_rank=4, learning_rate=5e-3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def stopped_after_step_5(run: Path, out: Path) -> Path:
    """`out` as a run that stopped after checkpoint-5 leaves it: that checkpoint and the log up to step 5."""
    out.mkdir()
    shutil.copytree(run / "checkpoint-5", out / "checkpoint-5")
    rows = [line for line in (run / "trainer_log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 5]
    (out / "trainer_log.jsonl").write_text("\n".join(rows) + "\n")
    return out / "checkpoint-5"


def logged_positions(out: Path) -> list[tuple]:
    """Each logged step's number, learning rate and epoch: where the run is in its schedule and data."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [(row["step"], row["lr"], row["epoch"]) for row in rows if "loss" in row]


def assert_same_optimizer_state(ours: Path, reference: Path) -> None:
    """The optimizer state of two checkpoints: the same parameters, Adam steps equal, moments within WEIGHT_TOL
    (the second moment relative to its size); the scheduler at the same step."""
    mine = torch.load(ours / "optimizer.pt", weights_only=True)
    theirs = torch.load(reference / "optimizer.pt", weights_only=True)
    assert mine["scheduler"] == theirs["scheduler"]
    assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    worst = {}
    for index, values in theirs["optimizer"]["state"].items():
        assert mine["optimizer"]["state"][index].keys() == values.keys()
        for key, value in values.items():
            our_value = mine["optimizer"]["state"][index][key]
            if key == "step":
                assert our_value.item() == value.item() == 10
                continue
            scale = value.abs().max().item() or 1.0
            difference = (our_value - value).abs().max().item()
            worst[key] = max(worst.get(key, 0.0), difference / scale)
            torch.testing.assert_close(our_value / scale, value / scale, **WEIGHT_TOL, msg=f"{index} {key}")
    print("max optimizer state difference relative to its size:", {k: f"{v:.2e}" for k, v in worst.items()})


def assert_continues(resumed: Path, reference: Path, file_name: str) -> None:
    assert_same_curve(logged_losses(resumed), logged_losses(reference))
    assert logged_positions(resumed) == logged_positions(reference)  # steps 1-5 then the resumed 6-10
    assert_same_weights(resumed, reference, file_name)
    assert_same_weights(resumed / "checkpoint-10", reference / "checkpoint-10", "trainable.safetensors")
    assert_same_optimizer_state(resumed / "checkpoint-10", reference / "checkpoint-10")


def one_process(model_dir, out: Path, **overrides) -> None:
    train(TrainArguments(**settings(model_dir, out, **overrides)))


# ---------------------------------------------------------------- across layouts


def test_a_resume_with_other_micro_batches_of_the_same_global_batch_reads_the_same_examples(model_dir, tmp_path):
    # batch 4 x accumulation 1 saved after 5 steps, resumed as batch 2 x accumulation 2: the checkpoint's
    # position is 5 groups (steps), not 5 of this run's micro-batches (which would restart at step 3's examples)
    straight = tmp_path / "straight"
    one_process(model_dir, straight, per_device_train_batch_size=4, save_steps=5)
    split = stopped_after_step_5(straight, tmp_path / "split")
    one_process(model_dir, tmp_path / "split", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                save_steps=5, resume_from_checkpoint=str(split))
    assert logged_positions(tmp_path / "split") == logged_positions(straight)
    state = json.loads((tmp_path / "split" / "checkpoint-10" / "trainer_state.json").read_text())
    assert (state["groups_in_epoch"], state["batch_in_epoch"]) == (10, 20)


def test_dp2_resumes_in_one_process(model_dir, tmp_path, tmp_path_factory):
    reference = single_process(model_dir, tmp_path_factory, **SAVED)
    torchrun(settings(model_dir, tmp_path / "dp2", per_device_train_batch_size=2, parallel="dp=2", **SAVED))
    checkpoint = stopped_after_step_5(tmp_path / "dp2", tmp_path / "resumed")
    one_process(model_dir, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **SAVED)
    assert_continues(tmp_path / "resumed", reference, "model.safetensors")


def test_one_process_resumes_under_fsdp2(model_dir, tmp_path, tmp_path_factory):
    reference = single_process(model_dir, tmp_path_factory, **SAVED)
    checkpoint = stopped_after_step_5(reference, tmp_path / "resumed")
    torchrun(settings(model_dir, tmp_path / "resumed", per_device_train_batch_size=2, parallel="fsdp=2",
                      resume_from_checkpoint=str(checkpoint), **SAVED))
    assert_continues(tmp_path / "resumed", reference, "model.safetensors")


def test_tp2_resumes_in_one_process(model_dir, tmp_path, tmp_path_factory):
    reference = single_process(model_dir, tmp_path_factory, **TP_ADAM, **SAVED)
    torchrun(settings(model_dir, tmp_path / "tp2", parallel="tp=2", **TP_ADAM, **SAVED))
    checkpoint = stopped_after_step_5(tmp_path / "tp2", tmp_path / "resumed")
    one_process(model_dir, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **TP_ADAM, **SAVED)
    assert_continues(tmp_path / "resumed", reference, "model.safetensors")


def test_fsdp2_resumes_under_tp2(model_dir, tmp_path, tmp_path_factory):
    """fsdp=2 of 2 examples per device and tp=2 of 4 (one data-parallel rank): the same global batch of 4."""
    reference = single_process(model_dir, tmp_path_factory, **SAVED)
    torchrun(settings(model_dir, tmp_path / "fsdp2", per_device_train_batch_size=2, parallel="fsdp=2", **SAVED))
    checkpoint = stopped_after_step_5(tmp_path / "fsdp2", tmp_path / "resumed")
    torchrun(settings(model_dir, tmp_path / "resumed", parallel="tp=2", resume_from_checkpoint=str(checkpoint),
                      **SAVED))
    assert_continues(tmp_path / "resumed", reference, "model.safetensors")


def test_lora_dp2_resumes_under_fsdp2(model_dir, tmp_path, tmp_path_factory):
    reference = single_process(model_dir, tmp_path_factory, **LORA, **SAVED)
    run = dict(per_device_train_batch_size=2, **LORA, **SAVED)
    torchrun(settings(model_dir, tmp_path / "dp2", parallel="dp=2", **run))
    checkpoint = stopped_after_step_5(tmp_path / "dp2", tmp_path / "resumed")
    torchrun(settings(model_dir, tmp_path / "resumed", parallel="fsdp=2", resume_from_checkpoint=str(checkpoint),
                      **run))
    assert_continues(tmp_path / "resumed", reference, "adapter_model.safetensors")


# ---------------------------------------------------------------- a checkpoint that does not fit, before any step


@pytest.fixture(scope="module")
def rank_8_checkpoint(model_dir, tmp_path_factory) -> Path:
    """checkpoint-1 of a LoRA rank 8 run on q_proj and v_proj (AdamW)."""
    out = tmp_path_factory.mktemp("rank8")
    one_process(model_dir, out, **RANK_8, max_steps=1, save_steps=1)
    return out / "checkpoint-1"


RANK_8 = dict(finetuning_type="lora", lora_rank=8, lora_target="q_proj,v_proj")
LORA_A = "model.layers.0.self_attn.{}_proj.lora_A.weight"


@pytest.mark.parametrize("run,message", [
    (dict(lora_rank=4), [f"{LORA_A.format('q')} is [8, 64] in the checkpoint but [4, 64] in this run (and 7 more "
                         f"tensors): it was saved with LoRA rank 8 on q_proj, v_proj (8 trainable tensors) and this "
                         f"run has LoRA rank 4 on q_proj, v_proj (8 trainable tensors); resume with the finetuning "
                         f"setup it was saved with"]),
    (dict(lora_target="q_proj,k_proj,v_proj"),
     [f"the checkpoint does not hold {LORA_A.format('k')}, ", " (and 1 more): it was saved with LoRA rank 8 on q_proj, "
      "v_proj (8 trainable tensors) and this run has LoRA rank 8 on k_proj, q_proj, v_proj (12 trainable tensors)"]),
    (dict(lora_target="q_proj"), [f"the checkpoint holds {LORA_A.format('v')}, ", ", which this run does not train: "
                                  "it was saved with LoRA rank 8 on q_proj, v_proj"]),
    (dict(finetuning_type="full"), ["the checkpoint does not hold model.embed_tokens.weight, ", " (and 18 more): it "
                                    "was saved with LoRA rank 8 on q_proj, v_proj (8 trainable tensors) and this run "
                                    "has 21 trainable tensors"]),
    (dict(optim="sgd"), ["the checkpoint was saved with the AdamW optimizer and this run uses SGD; resume with the "
                         "optim it was saved with"]),
], ids=["lora_rank", "more_targets", "fewer_targets", "full", "optimizer"])
def test_a_checkpoint_of_another_setup_is_refused_before_any_step_naming_both(model_dir, tmp_path,
                                                                               rank_8_checkpoint, run, message):
    """Formerly a raw torch error (a size mismatch in copy_; 'loaded state dict contains a parameter group that
    doesn't match the size of optimizer's group'), or, for another optimizer, KeyError 'momentum' at the first
    step."""
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as refused:
        one_process(model_dir, out, resume_from_checkpoint=str(rank_8_checkpoint), **{**RANK_8, **run})
    text = str(refused.value)
    assert text.startswith(f"{rank_8_checkpoint}: ") and all(part in text for part in message), text
    assert not list(out.glob("checkpoint-*")) and not (out / "trainer_log.jsonl").exists()


def test_a_lora_rank_the_checkpoint_lacks_is_refused_under_fsdp(model_dir, tmp_path,
                                                                              rank_8_checkpoint):
    out = tmp_path / "run"
    done = torchrun(settings(model_dir, out, per_device_train_batch_size=2, parallel="fsdp=2",
                             **{**RANK_8, "lora_rank": 4}, resume_from_checkpoint=str(rank_8_checkpoint)),
                    check=False)
    assert done.returncode != 0
    line = (f"danlu train: error: {rank_8_checkpoint}: {LORA_A.format('q')} is [8, 64] in the checkpoint but "
            f"[4, 64] in this run")
    # one line (the first rank to refuse it; torchrun then stops the other), not a torch error about sizes
    assert line in done.stderr and "must match the size" not in done.stderr, done.stderr[-4000:]
    assert not list(out.glob("checkpoint-*"))
