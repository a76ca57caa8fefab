"""Aggregating local models (danlu.distributed.aggregation): averaging and gathering over real gloo processes, and
the ensemble's logits against the formula log(mean softmax)."""
import json

import pytest
import torch
import torch.distributed as dist

from danlu.distributed.aggregation import Ensemble, average_parameters, gather_parameters
from danlu.distributed.parameter_server.local import run_locally

WORKERS = 3


def local_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():  # a frozen parameter, the same on every worker (a LoRA run's base): not exchanged
        model[0].bias.fill_(0.1)
    model[0].bias.requires_grad_(False)
    return model


def aggregate_on_rank(rank, world_size, out):
    dist.init_process_group("gloo")
    try:
        model = local_model(rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        members = gather_parameters(trainable)
        average_parameters(trainable)
        record = {"members": [[t.flatten().tolist() for t in member] for member in members],
                  "averaged": [p.detach().flatten().tolist() for p in trainable],
                  "frozen": model[0].bias.detach().tolist()}
        with open(f"{out}-{rank}.json", "w", encoding="utf-8") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_gather_and_average_over_real_processes(tmp_path):
    assert run_locally(aggregate_on_rank, WORKERS, (str(tmp_path / "rank"),), timeout=120) == [0] * WORKERS
    records = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORKERS)]
    expected_members = [[p.detach().flatten().tolist() for p in local_model(r).parameters() if p.requires_grad]
                        for r in range(WORKERS)]
    for record in records:
        assert record["members"] == expected_members
        mean = [torch.tensor([m[i] for m in expected_members]).mean(0) for i in range(3)]
        for got, want in zip(record["averaged"], mean):
            torch.testing.assert_close(torch.tensor(got), want)
    assert [r["frozen"] for r in records] == [local_model(r)[0].bias.tolist() for r in range(WORKERS)]


def test_the_ensemble_predicts_the_log_of_its_members_mean_distribution():
    models = [local_model(r) for r in range(WORKERS)]
    ensemble = Ensemble(models[0])
    ensemble.set_members([[p.detach().clone() for p in m.parameters() if p.requires_grad] for m in models])
    x = torch.randn(5, 4)
    expected = torch.stack([torch.softmax(m(x), -1) for m in models]).mean(0).log()
    torch.testing.assert_close(ensemble(x), expected)
    assert not any(p.requires_grad for p in ensemble.parameters())
    ensemble.train()
    assert not ensemble.training  # a teacher stays frozen when the loop calls train()
    # the model it was built from is untouched by the members loaded into its copy; the frozen bias is shared
    assert torch.equal(models[0][2].weight, local_model(0)[2].weight)
    assert ensemble.model[0].bias is models[0][0].bias and ensemble.model[2].weight is not models[0][2].weight


def test_an_ensemble_refuses_members_of_another_shape_and_silence():
    ensemble = Ensemble(local_model(0))
    with pytest.raises(RuntimeError, match="no members yet"):
        ensemble(torch.randn(1, 4))
    with pytest.raises(ValueError, match="ensemble member 0 has 1 parameters; the model trains 3"):
        ensemble.set_members([[torch.zeros(3)]])
    shapes = [p.shape for p in local_model(0).parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"ensemble member 1: a parameter of shape \(4,\) where the model has "
                                         r"\(8, 4\)"):
        ensemble.set_members([[torch.zeros(s) for s in shapes], [torch.zeros(4), *map(torch.zeros, shapes[1:])]])
