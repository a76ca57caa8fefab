"""The refactor into `fit` + recipes changed nothing: the loss curves equal the old loop's on the same seed.

tests/training/data/old_loop_losses.json was written by the training loop as it was before `fit` existed
(commit 574c195, `danlu.training.loop.train`), on exactly the configurations below.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from danlu.training.arguments import TrainArguments
from danlu.training.checkpoint import latest_checkpoint
from danlu.training.train import train

pytestmark = pytest.mark.real  # the tiny model carries the real tokenizer

OLD = json.loads((Path(__file__).parent / "data" / "old_loop_losses.json").read_text())
CASES = {
    "sft_lora": dict(lr_scheduler_type="cosine", warmup_steps=2, val_size=0.1, eval_strategy="steps", eval_steps=3),
    "sft_full": dict(finetuning_type="full", learning_rate=1e-3),
    "sft_packing": dict(packing=True, max_steps=4),
    "pt_lora": dict(stage="pt", dataset="danlu_pt", cutoff_len=32, max_steps=5),
}


@pytest.fixture
def dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))  # a fresh token cache
    data = tmp_path / "data"
    shutil.copytree("data", data)
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "danlu_pt": {"file_name": "pt.txt"}}))
    (data / "pt.txt").write_text("\n".join(f"Line {i}: the furnace refines the model, and the model learns "
                                           f"{i * 7 % 13} things." for i in range(60)))
    return data


def case_args(name, model_dir, data, out, **more):
    values = dict(model_name_or_path=str(model_dir), dataset="identity,danlu_instruct", dataset_dir=str(data),
                  finetuning_type="lora", lora_target="all", lora_rank=4, learning_rate=5e-3, max_steps=6,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1, save_steps=3,
                  cutoff_len=128, output_dir=str(out), seed=7)
    return TrainArguments(**{**values, **CASES[name], **more})


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_curves_equal_the_old_loop(name, tiny_chat_dir, dataset_dir, tmp_path):
    result = train(case_args(name, tiny_chat_dir, dataset_dir, tmp_path / name))
    assert result.train_losses == pytest.approx(OLD[name]["train"], abs=1e-5)
    assert result.eval_losses == pytest.approx(OLD[name]["eval"], abs=1e-5)


@pytest.mark.parametrize("name", ["sft_lora", "pt_lora"])
def test_resumed_run_equals_the_old_loop(name, tiny_chat_dir, dataset_dir, tmp_path, monkeypatch):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def ctrl_c_at_step_5(*a, **k):  # Ctrl-C during the 5th optimizer step
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    out = tmp_path / name
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(case_args(name, tiny_chat_dir, dataset_dir, out, save_steps=100))
    assert latest_checkpoint(out).name == "checkpoint-4"
    train(case_args(name, tiny_chat_dir, dataset_dir, out, resume_from_checkpoint="latest"))
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(OLD[name]["train"], abs=1e-5)
