"""`danlu train --parallel local=K`: workers training local models under torchrun, aggregated by averaging or by
ensemble-compression; `--shuffle global | local`; bad settings refused by name."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from danlu.distributed.layout import LayoutError, resolve_layout
from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.order import shard_order
from danlu.training.topology import Topology
from tests.distributed.test_data_parallel import settings, torchrun


def pretraining(model_dir, out, **overrides) -> dict:
    """pt on danlu_text: every block is cutoff_len tokens, all labelled, so every rank's mean weighs the same."""
    values = settings(model_dir, out, stage="pt", dataset="danlu_text", cutoff_len=32, per_device_train_batch_size=2,
                      max_steps=6, optim="sgd", sgd_momentum=0.0, learning_rate=0.05, max_grad_norm=0.0)
    values.update(overrides)
    return values


def test_averaging_after_every_sgd_step_is_data_parallel_sgd(model_dir, tmp_path):
    """Plain SGD: the mean of w - eta g_k is w - eta mean(g_k), the data-parallel step on the same examples."""
    torchrun(pretraining(model_dir, tmp_path / "local", parallel="local=2", sync_every=1), nproc=2)
    torchrun(pretraining(model_dir, tmp_path / "dp", parallel="dp=2"), nproc=2)
    ours, reference = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("local", "dp"))
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5)


def test_ensemble_compression_distils_from_the_ensemble_after_each_aggregation_and_resumes(model_dir, tmp_path):
    """Steps 1-3 learn from the labels, 4-6 from the labels and the ensemble gathered at step 3; a run resumed
    from checkpoint-3 starts with an empty ensemble again (until its step 6), then distils."""
    out = tmp_path / "ensemble"
    flags = dict(parallel="local=2", aggregate="ensemble", sync_every=3, kd_alpha=0.5, save_steps=3)
    torchrun(pretraining(model_dir, out, **flags), nproc=2)
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert len(steps) == 6
    assert all("kd_soft" not in row for row in steps[:3]) and all("kd_soft" in row for row in steps[3:])
    assert (out / "checkpoint-3").is_dir() and (out / "model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    torchrun(pretraining(model_dir, resumed, max_steps=9, resume_from_checkpoint="latest", **flags), nproc=2)
    rows = [json.loads(line) for line in (resumed / "trainer_log.jsonl").read_text().splitlines()]
    assert [("kd_soft" in row) for row in rows if "loss" in row] == [False, False, False, True, True, True]
    assert json.loads((resumed / "checkpoint-9" / "trainer_state.json").read_text())["global_step"] == 9


@pytest.mark.parametrize("shuffle", ["global", "local"])
def test_every_epoch_splits_the_whole_set_among_the_workers(shuffle):
    shards = {epoch: [shard_order(40, 3, epoch, Topology(rank=r, world_size=4), shuffle) for r in range(4)]
              for epoch in range(3)}
    for epoch, parts in shards.items():
        assert sorted(i for part in parts for i in part) == list(range(40))
    same_sets = all(set(shards[0][r]) == set(shards[e][r]) for r in range(4) for e in (1, 2))
    assert same_sets == (shuffle == "local")
    assert all(shards[0][r] != shards[1][r] for r in range(4))  # reshuffled either way


@pytest.mark.parametrize("flags, message", [
    (dict(parallel="local=2,tp=2"), r"parallel: local=2 \(workers training local models\) does not combine with tp=2"),
    (dict(parallel="local=2", aggregate="mean"), "aggregate"),
    (dict(parallel="local=2", sync_every=0), "sync_every must be a positive number of steps, got 0"),
    (dict(parallel="local=2", shuffle="none"), "shuffle"),
    (dict(parallel="local=2", aggregate="ensemble", stage="rm", dataset="identity_preference"),
     "aggregate ensemble distils the workers' next-token distributions; it runs stages pt and sft, not rm"),
])
def test_bad_local_model_settings_are_refused_by_name(model_dir, tmp_path, flags, message):
    with pytest.raises(ArgumentError, match=message):
        TrainArguments(**settings(model_dir, tmp_path, **flags))


def test_local_models_need_as_many_processes_as_workers():
    assert resolve_layout("local=4", None, 4).world_size == 4
    with pytest.raises(LayoutError, match="2 local models are 2 processes, but the world size"):
        resolve_layout("local=2", None, 3)
