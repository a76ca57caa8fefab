"""Pipeline parallel (pp) in real processes: `torchrun ... -m danlu train --parallel pp=2` on gloo, compared step by
step with one process. A pipeline's micro-batches are the accumulation micro-batches, so pp does not change the
global batch: pp=2 equals one process with the same per-device batch and accumulation; dp=2,pp=2 one process with
twice the batch. A 4-layer tiny Llama with tied embeddings (the head's copy of the embedding on the last stage).

Tolerance as tests/distributed/test_data_parallel.py: losses to a relative 1e-5, weights to 1e-5.
"""
import json

import pytest
import torch

from danlu.distributed.pipeline_parallel import keep_stage
from danlu.models.pipeline_stages import stage_layers
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.train import train
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model
from tests.distributed.test_data_parallel import (assert_resume_continues, assert_same_curve, assert_same_weights,
                                                  logged_losses, settings, single_process, torchrun)
from tests.distributed.test_tensor_parallel_training import as_rank_0_of

ACCUMULATION = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          num_hidden_layers=4, tie_word_embeddings=True)
    return save_hf_model(model, tmp_path_factory.mktemp("model"), tokenizer)


# ---------------------------------------------------------------- parity with one process


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_two_stages_equal_one_process(model_dir, tmp_path, tmp_path_factory, schedule):
    single = single_process(model_dir, tmp_path_factory, **ACCUMULATION)
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, parallel="pp=2", pipeline_schedule=schedule, **ACCUMULATION))
    assert_same_curve(logged_losses(out), logged_losses(single))
    assert_same_weights(out, single, "model.safetensors")
    assert json.loads((out / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    assert_same_weights(out / "checkpoint-10", single / "checkpoint-10", "trainable.safetensors")


def test_evaluation_through_the_pipeline_equals_one_process(model_dir, tmp_path, tmp_path_factory):
    evaluation = dict(val_size=0.2, eval_strategy="steps", eval_steps=5, load_best_model_at_end=True,
                      **ACCUMULATION)
    single = single_process(model_dir, tmp_path_factory, **evaluation)
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, parallel="pp=2", **evaluation))
    ours, reference = logged_losses(out, "eval_loss"), logged_losses(single, "eval_loss")
    assert len(ours) == 2 and ours == pytest.approx(reference, rel=1e-5)
    assert_same_weights(out, single, "model.safetensors")  # the best checkpoint's, loaded back at the end


def test_three_uneven_stages_with_lora_equal_one_process(model_dir, tmp_path, tmp_path_factory):
    lora = dict(finetuning_type="lora", lora_rank=4, learning_rate=5e-3, per_device_train_batch_size=2,
                gradient_accumulation_steps=3)
    single = single_process(model_dir, tmp_path_factory, **lora)
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, parallel="pp=3", pipeline_first_stage_layers=1, pipeline_last_stage_layers=2,
                      **lora), nproc=3)
    assert_same_curve(logged_losses(out), logged_losses(single))
    assert_same_weights(out, single, "adapter_model.safetensors")


@pytest.mark.parametrize("parallel", ["dp=2,pp=2", "fsdp=2,pp=2"])
def test_data_and_pipeline_parallel_on_4_processes_equal_one_process_with_twice_the_batch(model_dir, tmp_path,
                                                                                         tmp_path_factory, parallel):
    single = single_process(model_dir, tmp_path_factory, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, parallel=parallel, **ACCUMULATION), nproc=4)
    assert_same_curve(logged_losses(out), logged_losses(single))
    assert_same_weights(out, single, "model.safetensors")


def test_tensor_and_pipeline_parallel_on_4_processes_equal_one_process(model_dir, tmp_path, tmp_path_factory):
    single = single_process(model_dir, tmp_path_factory, **ACCUMULATION)
    out = tmp_path / "run"
    torchrun(settings(model_dir, out, parallel="tp=2,pp=2", **ACCUMULATION), nproc=4)
    assert_same_curve(logged_losses(out), logged_losses(single))
    assert_same_weights(out, single, "model.safetensors")
    assert_same_weights(out / "checkpoint-10", single / "checkpoint-10", "trainable.safetensors")


def test_pp2_resume_at_the_same_layout_continues_the_same_curve(model_dir, tmp_path):
    assert_resume_continues(model_dir, tmp_path, parallel="pp=2", **ACCUMULATION)


# ---------------------------------------------------------------- the stages


def test_layers_split_evenly_or_as_the_first_and_last_stage_say():
    assert stage_layers(30, 2) == [range(0, 15), range(15, 30)]
    assert stage_layers(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert stage_layers(30, 4, first=6, last=6) == [range(0, 6), range(6, 15), range(15, 24), range(24, 30)]
    assert stage_layers(4, 2, first=1) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("stages, first, last, message", [
    (5, None, None, "pp=5 stages over 4 layers: each stage needs at least one layer"),
    (3, 2, 2, "leaves 0 layer(s) for the other 1 stage(s)"),
    (2, 1, 1, "the first 1, last 1 stage layers add up to 2, not the model's 4 layers"),
    (2, 0, None, "pipeline_first_stage_layers must be at least 1, got 0"),
    (1, 2, None, "pipeline_first_stage_layers=2 needs pp > 1"),
])
def test_bad_stage_splits_are_refused_naming_the_numbers(stages, first, last, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stage_layers(4, stages, first, last)


def test_stages_chained_compute_the_whole_model():
    config = get_preset("tiny-llama")
    torch.manual_seed(0)
    whole = Transformer(config).eval()
    stages = []
    for index, layers in enumerate(stage_layers(config.num_hidden_layers, 2)):
        stage = Transformer(config).eval()
        stage.load_state_dict(whole.state_dict())
        keep_stage(stage, layers, first=index == 0, last=index == 1)
        stages.append(stage)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(stages[1](stages[0](ids)), whole(ids), rtol=0, atol=0)
    names = [name for name, _ in stages[1].named_parameters()]
    assert names[0].startswith("model.layers.1.") and "model.embed_tokens.weight" not in names


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("overrides, message", [
    (dict(parallel="pp=5"), "pp=5 stages over 4 layers"),
    (dict(parallel="pp=2", stage="dpo", dataset="dpo_en_demo"), "pipeline parallel does not run stage dpo"),
    (dict(parallel="pp=2", packing=True), "does not run packing"),
    (dict(parallel="pp=2", pipeline_first_stage_layers=4), "leaves 0 layer(s) for the other 1 stage(s)"),
    (dict(parallel="pp=2", gradient_accumulation_steps=1), "pipeline_schedule 1f1b needs at least as many "
                                                          "micro-batches (gradient_accumulation_steps, 1) as stages"),
])
def test_what_pipelines_do_not_run_is_refused_naming_it(model_dir, tmp_path, monkeypatch, overrides, message):
    as_rank_0_of(monkeypatch, 2 if overrides["parallel"] == "pp=2" else 5)
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(TrainArguments(**settings(model_dir, tmp_path / "run", **{"gradient_accumulation_steps": 8,
                                                                        **overrides})))
    assert not (tmp_path / "run").exists()


def test_a_bad_schedule_name_is_refused(model_dir, tmp_path):
    with pytest.raises(ArgumentError, match="pipeline_schedule"):
        TrainArguments(**settings(model_dir, tmp_path / "run", pipeline_schedule="zb"))


@pytest.mark.real
def test_two_stage_lora_on_smollm2_equals_one_process(real_gguf, tmp_path):
    """The README's LoRA run on the real (tied) model, as a user types it under torchrun with pp=2."""
    import os
    import subprocess
    import sys

    from danlu.training.arguments import parse_train_arguments
    from tests.distributed.test_data_parallel import REPO

    common = ["--max_steps", "2", "--eval_strategy", "no", "--logging_steps", "1", "--plot_loss", "false",
              "--cutoff_len", "128", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--model_name_or_path", str(real_gguf)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "danlu",
               "train", "examples/quickstart_lora.yaml", "--parallel", "pp=2", "--output_dir", str(tmp_path / "pp2"),
               *common]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    train(parse_train_arguments([str(REPO / "examples/quickstart_lora.yaml"), "--output_dir", str(tmp_path / "single"),
                                 "--dataset_dir", str(REPO / "data"), *common]))
    assert_same_curve(logged_losses(tmp_path / "pp2"), logged_losses(tmp_path / "single"), steps=2)
    assert_same_weights(tmp_path / "pp2", tmp_path / "single", "adapter_model.safetensors",
                        dict(atol=5e-5, rtol=1e-3))
