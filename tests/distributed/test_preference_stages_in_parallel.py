"""Reward modelling and preference training (rm, dpo, kto) under sharded data parallel and tensor parallel, in real
processes, equal to one process taking the same global batch: the value head (called after the model's forward)
is a unit of its own under FSDP2, DPO's reference forward and KTO's KL batch run on the sharded model.
Tolerances as tests/distributed/test_data_parallel.py."""
import pytest

from danlu.training.arguments import TrainArguments
from danlu.training.train import train
from tests.distributed.test_data_parallel import (assert_same_curve, assert_same_weights, logged_losses, settings,
                                                  torchrun)
from tests.distributed.test_tensor_parallel_training import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("stage, dataset, parallel, saved", [
    ("rm", "identity_preference", "fsdp=2", "value_head.safetensors"),
    ("rm", "identity_preference", "tp=2", "value_head.safetensors"),
    ("dpo", "identity_preference", "fsdp=2", "model.safetensors"),
    ("kto", "identity_kto", "tp=2", "model.safetensors"),
])
def test_preference_stages_equal_one_process(model_dir, tmp_path, stage, dataset, parallel, saved):
    run = dict(stage=stage, dataset=dataset, max_steps=4)
    single = tmp_path / "single"
    train(TrainArguments(**settings(model_dir, single, per_device_train_batch_size=4, **run)))
    out = tmp_path / "run"
    # a tensor-parallel pair reads one device batch; two fsdp ranks each read half of it
    torchrun(settings(model_dir, out, parallel=parallel, per_device_train_batch_size=4 if "tp" in parallel else 2,
                      **run))
    assert_same_curve(logged_losses(out), logged_losses(single), steps=4)
    assert_same_weights(out, single, saved)
