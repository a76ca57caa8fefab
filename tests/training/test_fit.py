"""`fit` knows no loss: a stage written here in a few lines trains through it, with checkpoints and resume."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.training.checkpoint import list_checkpoints
from danlu.training.loop import FitConfig, TrainingStopped, fit
from danlu.training.optim import build_optimizer
from danlu.training.schedule import build_scheduler
from danlu.training.stage import Stage, StepOutput
from danlu.training.topology import Topology


# ---- a toy stage, start to end: "predict the token after x is x + 1" --------------------------------------
def counting_stage(vocab: int = 256) -> Stage:
    examples = [torch.arange(start, start + 16) % vocab for start in range(0, 240, 3)]

    def step(model, batch):
        logits = model(batch["ids"][:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch["ids"][:, 1:].reshape(-1))
        accuracy = (logits.argmax(-1) == batch["ids"][:, 1:]).float().mean()
        return StepOutput(loss, batch["ids"].numel(), {"accuracy": accuracy.item()}, weight=len(batch["ids"]))

    return Stage(examples[8:], examples[:8], lambda rows: {"ids": torch.stack(rows)}, step)


def run_toy(out, max_steps=12, resume_from=None, **config):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama"))
    optimizer = build_optimizer(model, "adamw_torch", 2e-2, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, "cosine", 2, max_steps)
    settings = dict(output_dir=out, max_steps=max_steps, batch_size=4, gradient_accumulation_steps=2,
                    logging_steps=1, save_steps=4, eval_strategy="steps", eval_steps=6, resume_from=resume_from)
    return fit(model, counting_stage(), optimizer, scheduler, FitConfig(**{**settings, **config})), model


def logged(out, key):
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def test_a_toy_stage_learns_logs_its_metrics_and_checkpoints(tmp_path):
    result, _ = run_toy(tmp_path)
    assert result.state.global_step == 12 and result.train_losses[-1] < result.train_losses[0] / 2
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert len(logged(tmp_path, "accuracy")) == 12 and len(logged(tmp_path, "eval_accuracy")) == 2
    assert logged(tmp_path, "eval_loss") == pytest.approx(result.eval_losses)


def test_ctrl_c_then_resume_continues_the_same_curve(tmp_path, monkeypatch):
    straight, model = run_toy(tmp_path / "straight")
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def ctrl_c_at_step_7(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c_at_step_7)
        with pytest.raises(KeyboardInterrupt):
            run_toy(tmp_path / "split", save_steps=100)
    assert [c.name for c in list_checkpoints(tmp_path / "split")] == ["checkpoint-6"]
    resumed, resumed_model = run_toy(tmp_path / "split", resume_from=tmp_path / "split" / "checkpoint-6")
    assert logged(tmp_path / "split", "loss") == pytest.approx(straight.train_losses, abs=1e-6)
    assert resumed.eval_losses == pytest.approx(straight.eval_losses[1:], abs=1e-6)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_resume_from_an_earlier_checkpoint_rewrites_the_later_log_records(tmp_path):
    # a run that went on past its last checkpoint (and crashed) had logged steps the resume trains again
    straight, _ = run_toy(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    run_toy(tmp_path / "crashed", resume_from=tmp_path / "crashed" / "checkpoint-4")
    assert logged(tmp_path / "crashed", "step") == logged(tmp_path / "straight", "step")  # each step once
    assert logged(tmp_path / "crashed", "loss") == pytest.approx(straight.train_losses, abs=1e-6)


def fit_briefly(out, stage, max_steps, topology=Topology(), **config):
    model = Transformer(get_preset("tiny-llama"))
    optimizer = build_optimizer(model, "sgd", 1e-2)
    return fit(model, stage, optimizer, build_scheduler(optimizer, "constant", 0, max_steps),
               FitConfig(out, max_steps=max_steps, batch_size=4, **config), topology)


def test_a_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    stage, calls = counting_stage(), []
    good_step = stage.step

    def step_going_nan(model, batch):  # from the 6th optimizer step on (two micro-batches a step)
        calls.append(1)
        out = good_step(model, batch)
        return out._replace(loss=out.loss * float("nan")) if len(calls) > 10 else out

    stage.step = step_going_nan
    with pytest.raises(TrainingStopped, match="nan at step 6.*checkpoint-4"):
        fit_briefly(tmp_path, stage, 12, gradient_accumulation_steps=2, save_steps=4)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_topology_shards_each_epoch_evenly_and_only_the_main_rank_writes(tmp_path):
    order = list(range(10))
    assert [Topology(rank, 3).shard(order) for rank in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert Topology().shard(order) == order
    with pytest.raises(ValueError, match="rank 3 is not within world_size 2"):
        Topology(3, 2)
    result = fit_briefly(tmp_path / "rank1", counting_stage(), 2, Topology(1, 2), save_steps=1)
    assert result.state.global_step == 2 and not (tmp_path / "rank1").exists()


def test_environment_topology_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    topology = Topology.from_environment(device="cpu")
    assert (topology.rank, topology.world_size, topology.is_main) == (2, 4, False)


def test_a_checkpoint_of_other_trainable_weights_is_refused_by_name(tmp_path):
    from danlu.training.checkpoint import load_trainable
    from danlu.tuning.lora import LoRAConfig, apply_lora

    run_toy(tmp_path, max_steps=4)  # every weight trains: no LoRA weight in checkpoint-4
    model = Transformer(get_preset("tiny-llama"))
    apply_lora(model, LoRAConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"checkpoint-4: the checkpoint does not hold .*q_proj\.lora_A"):
        load_trainable(model, tmp_path / "checkpoint-4")
