"""`danlu train --parallel ps=K` under torchrun: a parameter server and K workers training a tiny random Llama.

One worker without delay is the one-process run exactly (same logged losses, same weights); two free-running
workers train, log their staleness, checkpoint and save as any run; bad settings are refused by name."""
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from danlu.distributed.layout import LayoutError, resolve_layout
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.train import train
from tests.distributed.test_data_parallel import REPO, logged_losses, settings, torchrun, torchrun_command


def run_single(model_dir, out, **overrides):
    return train(TrainArguments(**settings(model_dir, out, **overrides)))


def test_one_worker_is_the_one_process_run_exactly(model_dir, tmp_path):
    """DC-ASGD with one worker and no delay: every gradient lands on the weights it was computed at, so the
    compensation is zero and the server's steps are the one loop's (the in-process tests cover every rule)."""
    torchrun(settings(model_dir, tmp_path / "ps", parallel="ps=1", ps_update="dcasgd-a", max_steps=6), nproc=2)
    run_single(model_dir, tmp_path / "single", max_steps=6)
    assert logged_losses(tmp_path / "ps") == logged_losses(tmp_path / "single")
    ours, reference = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ps", "single"))
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_two_free_running_workers_train_log_their_delay_and_save(model_dir, tmp_path):
    out = tmp_path / "ps"
    torchrun(settings(model_dir, out, parallel="ps=2", ps_update="dcasgd-c", finetuning_type="lora", max_steps=12,
                      save_steps=6, eval_strategy="steps", eval_steps=6, val_size=0.1), nproc=3)
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 13))
    assert all(row["ps_delay"] >= 0 for row in steps) and any(row["ps_delay"] > 0 for row in steps)
    assert [row["step"] for row in rows if "eval_loss" in row] == [6, 12]
    assert (out / "checkpoint-6" / "trainer_state.json").is_file() and (out / "checkpoint-12").is_dir()
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12


def test_a_parameter_server_run_resumes_from_its_checkpoint(model_dir, tmp_path):
    """The worker's place in its data and dcasgd-a's mean square are saved with the checkpoint and carried on: the
    resumed run's losses and mean square are those of the run that did not stop (one worker, no delay, a constant
    learning rate: the same gradients in the same order)."""
    flags = dict(parallel="ps=1", ps_update="dcasgd-a", save_steps=4, lr_scheduler_type="constant")
    torchrun(settings(model_dir, tmp_path / "whole", max_steps=8, **flags), nproc=2)
    out = tmp_path / "ps"
    torchrun(settings(model_dir, out, max_steps=4, **flags), nproc=2)
    first = load_file(str(out / "checkpoint-4" / "extra_state.safetensors"))
    assert first.pop("ps.applied_from").tolist() == [4] and first and all(k.startswith("mean_square.") for k in first)
    torchrun(settings(model_dir, out, max_steps=8, resume_from_checkpoint="latest", **flags), nproc=2)
    assert logged_losses(out) == logged_losses(tmp_path / "whole")
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    resumed, whole = (load_file(str(d / "checkpoint-8" / "extra_state.safetensors")) for d in (out, tmp_path / "whole"))
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key])


@pytest.mark.parametrize("flags, message", [
    (dict(parallel="ps=2,dp=2"), r"parallel: ps=2 \(a parameter server and its workers\) does not combine with dp=2"),
    (dict(parallel="ps=2", ps_update="dcasgd"), "ps_update"),
    (dict(parallel="ps=2", dc_lambda=-1.0), "dc_lambda must be >= 0, got -1.0"),
    (dict(parallel="ps=2", dc_momentum=1.0), r"dc_momentum must be in \[0, 1\), got 1.0"),
    (dict(parallel="ps=2", ps_delay=-2), "ps_delay must be a number of updates >= 0, got -2"),
    (dict(parallel="ps=2", ps_worker_timeout=0.0), "ps_worker_timeout must be a positive number of seconds"),
])
def test_bad_parameter_server_settings_are_refused_by_name(model_dir, tmp_path, flags, message):
    with pytest.raises(ArgumentError, match=message):
        TrainArguments(**settings(model_dir, tmp_path, **flags))


def test_a_worker_killed_under_torchrun_leaves_the_server_and_the_other_worker_to_finish(model_dir, tmp_path):
    """torchrun stops a whole job when one of its processes fails; a ps worker rank runs its worker as a child, so
    the worker's SIGKILL ends the rank cleanly and the server goes on without it (the run finishes, exit 0)."""
    from tests.distributed.test_launch import Launched, children, workers

    out = tmp_path / "ps"
    values = settings(model_dir, out, parallel="ps=2", ps_update="asgd", max_steps=60, save_steps=10,
                      ps_worker_timeout=2)
    launcher = Launched(torchrun_command(values, nproc=3), tmp_path / "torchrun")
    deadline = time.monotonic() + 90
    while not (out / "checkpoint-10" / "trainer_state.json").is_file():
        assert launcher.poll() is None, f"torchrun ended before checkpoint-10:\n{launcher.wait(1)[2][-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint-10 after 90 s"
        time.sleep(0.01)
    rank_2 = workers(launcher)[2]
    worker_1 = children(rank_2)
    assert len(worker_1) == 1 and not (out / "model.safetensors").exists(), "the run ended before the kill"
    os.kill(worker_1[0], signal.SIGKILL)
    code, _, stderr = launcher.wait(120)
    assert code == 0, stderr[-4000:]
    assert "parameter server worker 1 (rank 2" in stderr and "died of SIGKILL" in stderr
    assert "parameter server: worker 1 not heard from for" in stderr and "going on with the 1 other" in stderr
    assert len(logged_losses(out)) == 60 and (out / "model.safetensors").is_file()


def test_a_parameter_server_layout_needs_its_worker_count_plus_one_processes():
    assert resolve_layout("ps=3", None, 4).world_size == 4
    with pytest.raises(LayoutError, match="a parameter server and 3 workers are 4 processes, but the world size"):
        resolve_layout("ps=3", None, 3)


def test_ppo_is_refused_on_a_parameter_server(model_dir, tmp_path):
    with pytest.raises(ArgumentError, match="ppo takes several steps per rollout and does not run on it"):
        TrainArguments(**settings(model_dir, tmp_path, parallel="ps=1", stage="ppo", reward_model_type="rule"))


@pytest.mark.real
def test_a_parameter_server_lora_run_on_the_bundled_model(tmp_path):
    """The README's command: LoRA SFT of SmolLM2-135M-Instruct by a server and 2 DC-ASGD workers."""
    out = tmp_path / "ps"
    values = dict(dataset="identity,danlu_instruct", dataset_dir=str(REPO / "data"), finetuning_type="lora",
                  lora_target="all", learning_rate=1e-3, max_steps=6, per_device_train_batch_size=2, cutoff_len=128,
                  logging_steps=1, save_steps=100, eval_strategy="steps", eval_steps=3, val_size=0.1,
                  output_dir=str(out), parallel="ps=2", ps_update="dcasgd-c")
    torchrun(values, nproc=3)
    evals = logged_losses(out, "eval_loss")
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert any(row > 0 for row in logged_losses(out, "ps_delay"))
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("skip", [0, 3, 7, 12])
def test_a_resumed_worker_goes_on_with_the_group_after_its_last_applied(skip):
    """Worker 1 of 2 over 20 examples, batches of 2: 5 groups an epoch; skipping crosses epochs as reading did."""
    from itertools import islice
    from types import SimpleNamespace

    from danlu.training.on_parameter_server import worker_groups
    from danlu.training.stage import Stage

    stage = Stage(train=list(range(20)), eval=[], collate=list, step=None)
    args = SimpleNamespace(seed=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, shuffle="global")
    whole = list(islice(worker_groups(stage, args, 1, 2), 20))
    assert list(islice(worker_groups(stage, args, 1, 2, skip), 20 - skip)) == whole[skip:]
