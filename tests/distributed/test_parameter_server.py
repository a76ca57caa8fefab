"""The parameter server (danlu.distributed.parameter_server): DC-ASGD's update against the formula, the reduction to
sequential SGD, synchronous rounds, injected and real staleness, and a worker killed mid-run (real processes over
torch.distributed.rpc)."""
from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time

import pytest
import torch

from danlu.distributed.parameter_server.local import run_locally
from danlu.distributed.parameter_server.rules import MEAN_SQUARE_EPS, DelayCompensation, compensated_gradient
from danlu.distributed.parameter_server.run import ServerSettings, run_parameter_server, step_gradient
from danlu.distributed.parameter_server.server import ParameterServer

ETA, LAMBDA, MOMENTUM = 0.1, 0.04, 0.95


def regression_batch(index: int, worker: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + index)
    x = torch.randn(8, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def mse_step(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def sgd_server(model, workers=1, max_updates=100, rule="asgd", **kwargs) -> ParameterServer:
    return ParameterServer(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=ETA), workers,
                           max_updates, rule, dc_lambda=LAMBDA, dc_momentum=MOMENTUM, **kwargs)


def pull_into(server, worker, model) -> int:
    version, weights = server.pull(worker)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    return version


def gradient(model, batch) -> list[torch.Tensor]:
    model.zero_grad()
    mse_step(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------ the update rules


def test_compensated_gradient_is_the_papers_formula():
    g, w, backup = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.5, 3.0])
    expected = torch.tensor([0.5 + LAMBDA * 0.25 * 0.5, -1.0 + LAMBDA * 1.0 * -0.5, 2.0])
    torch.testing.assert_close(compensated_gradient(g, w, backup, LAMBDA), expected, rtol=0, atol=0)


def test_adaptive_lambda_follows_the_mean_square_of_the_gradients():
    rule = DelayCompensation("dcasgd-a", LAMBDA, MOMENTUM)
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    ms1 = (1 - MOMENTUM) * g1 ** 2
    torch.testing.assert_close(rule.strength(0, g1), LAMBDA / (ms1.sqrt() + MEAN_SQUARE_EPS))
    ms2 = MOMENTUM * ms1 + (1 - MOMENTUM) * g2 ** 2
    torch.testing.assert_close(rule.strength(0, g2), LAMBDA / (ms2.sqrt() + MEAN_SQUARE_EPS))
    assert DelayCompensation("dcasgd-c", LAMBDA).strength(0, g1) == LAMBDA


def test_the_adaptive_rules_mean_square_survives_its_state_dict():
    rule, copy_of_it = DelayCompensation("dcasgd-a", LAMBDA, MOMENTUM), DelayCompensation("dcasgd-a", LAMBDA, MOMENTUM)
    for g in (torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])):
        rule.strength(1, g)
    copy_of_it.load_state_dict(rule.state_dict())
    g = torch.tensor([3.0, 0.25])
    torch.testing.assert_close(copy_of_it.strength(1, g), rule.strength(1, g), rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["dcasgd-c", "dcasgd-a"])
def test_a_delayed_gradient_is_compensated_by_the_weights_moved_since_its_pull(rule):
    """Workers 0 and 1 pull w0; 1 pushes first (w1 = w0 - eta g1, no delay); 0's gradient, computed at w0, lands
    on w1: w2 = w1 - eta (g0 + lambda_t g0 (.) g0 (.) (w1 - w0))."""
    model, worker = tiny_model(), tiny_model()
    server = sgd_server(model, workers=2, rule=rule)
    pull_into(server, 0, worker)
    w0 = [p.detach().clone() for p in model.parameters()]
    g0 = gradient(worker, regression_batch(0))
    pull_into(server, 1, worker)
    g1 = gradient(worker, regression_batch(1))
    server.push(1, g1, 0, 1.0)
    w1 = [p.detach().clone() for p in model.parameters()]
    server.push(0, g0, 0, 1.0)
    for index, (p, a, b, g, h) in enumerate(zip(model.parameters(), w0, w1, g0, g1)):
        strength = LAMBDA
        if rule == "dcasgd-a":
            ms = MOMENTUM * (1 - MOMENTUM) * h ** 2 + (1 - MOMENTUM) * g ** 2
            strength = LAMBDA / (ms.sqrt() + MEAN_SQUARE_EPS)
        torch.testing.assert_close(b, a - ETA * h)
        torch.testing.assert_close(p.detach(), b - ETA * (g + strength * g * g * (b - a)))
    assert [push.delay for push in server.pushes] == [0, 1]


# ------------------------------------------------------------------ one worker, no delay: sequential SGD


def sequential_sgd(steps: int) -> torch.nn.Module:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA)
    for i in range(steps):
        optimizer.zero_grad()
        mse_step(model, regression_batch(i)).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("rule", ["asgd", "dcasgd-c", "dcasgd-a", "ssgd"])
def test_one_worker_without_delay_is_sequential_sgd_exactly(rule):
    steps = 20
    model, worker = tiny_model(), tiny_model()
    server = sgd_server(model, max_updates=steps, rule=rule)
    for i in range(steps):
        version = pull_into(server, 0, worker)
        server.push(0, gradient(worker, regression_batch(i)), version, 0.0)
    for p, q in zip(model.parameters(), sequential_sgd(steps).parameters()):
        assert torch.equal(p, q)
    assert server.pull(0)[1] is None and server.done_updating


def test_a_synchronous_round_averages_every_workers_gradient():
    """Two workers in threads: each round is one step on the mean of both gradients, whoever pushes first."""
    rounds = 6
    model = tiny_model()
    server = sgd_server(model, workers=2, max_updates=rounds, rule="ssgd")

    def run(worker):
        replica = tiny_model()
        for i in range(rounds):
            version = pull_into(server, worker, replica)
            server.push(worker, gradient(replica, regression_batch(i, worker)), version, 0.0)
        server.finish(worker)

    threads = [threading.Thread(target=run, args=(m,)) for m in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(server.wait()) == 2 * rounds and server.version == rounds
    expected = tiny_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=ETA)
    for i in range(rounds):
        optimizer.zero_grad()
        grads = [gradient(copy.deepcopy(expected), regression_batch(i, m)) for m in range(2)]
        for p, g0, g1 in zip(expected.parameters(), *grads):
            p.grad = torch.stack([g0, g1]).mean(0)
        optimizer.step()
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_injected_delay_hands_out_the_weights_of_tau_updates_ago():
    model, worker = tiny_model(), tiny_model()
    server = sgd_server(model, max_updates=8, delay=3)
    for i in range(8):
        version = pull_into(server, 0, worker)
        server.push(0, gradient(worker, regression_batch(i)), version, 0.0)
    assert [push.delay for push in server.pushes] == [0, 1, 2, 3, 3, 3, 3, 3]


def test_bad_settings_and_pushes_are_refused_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match="ps_update: unknown rule 'dcasgd'"):
        sgd_server(model, rule="dcasgd")
    with pytest.raises(ValueError, match="dc_lambda must be >= 0"):
        DelayCompensation("dcasgd-c", -1.0)
    with pytest.raises(ValueError, match="dc_momentum must be in"):
        DelayCompensation("dcasgd-a", 0.1, 1.0)
    with pytest.raises(ValueError, match="ps_delay must be >= 0"):
        sgd_server(model, delay=-1)
    server = sgd_server(model, workers=2)
    with pytest.raises(ValueError, match="worker 5 is not one of this server's 2 workers"):
        server.pull(5)
    with pytest.raises(ValueError, match="worker 0 pushed 1 gradients; the server holds 2"):
        server.push(0, [torch.zeros(1, 4)], 0, 0.0)


def test_a_nan_loss_stops_the_run_and_every_caller_hears_of_it():
    model, worker = tiny_model(), tiny_model()
    server = sgd_server(model, max_updates=5)
    version = pull_into(server, 0, worker)
    with pytest.raises(FloatingPointError, match="the loss became nan at update 1"):
        server.push(0, gradient(worker, regression_batch(0)), version, float("nan"))
    with pytest.raises(FloatingPointError):
        server.wait()


# ------------------------------------------------------------------ real processes over RPC


def endless_batches(worker: int):
    index = 0
    while True:
        yield regression_batch(index, worker)
        index += 1


def slow_step(model, batch):
    """A gradient that takes a while, so that the workers overlap (and can be killed, or fail, mid-run)."""
    call = next(_calls)
    if os.environ.get("KILL_AFTER") and int(os.environ["KILL_AFTER"]) == call:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FAIL_AFTER") and int(os.environ["FAIL_AFTER"]) == call:
        raise ValueError("a batch this worker cannot take")
    time.sleep(0.005)
    return mse_step(model, batch)


_calls = iter(range(1, 10 ** 9))


def ps_process(rank, world_size, rule, updates, out, kill_rank=None, worker_timeout=60.0, how="KILL_AFTER"):
    if rank == kill_rank:
        os.environ[how] = "10"
    model = tiny_model()
    settings = ServerSettings(max_updates=updates, rule=rule, worker_timeout=worker_timeout)
    server = run_parameter_server(rank, world_size, model, settings,
                                  lambda m: (torch.optim.SGD(m.parameters(), lr=0.02), None),
                                  endless_batches, step_gradient(slow_step))
    if rank == 0:
        record = {"delays": [p.delay for p in server.pushes], "workers": [p.worker for p in server.pushes],
                  "updates": server.version, "lost": sorted(server.lost),
                  "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(record, f)


def run_ps(tmp_path, rule, workers, updates, **kwargs) -> tuple[list, dict]:
    out = tmp_path / "server.json"
    codes = run_locally(ps_process, workers + 1, (rule, updates, str(out), *kwargs.values()), timeout=120)
    return codes, json.loads(out.read_text(encoding="utf-8"))


def test_four_free_running_workers_push_stale_gradients(tmp_path):
    codes, record = run_ps(tmp_path, "dcasgd-c", 4, 120)
    assert codes == [0] * 5
    assert len(record["delays"]) == 120 and set(record["workers"]) == {0, 1, 2, 3}
    assert max(record["delays"]) > 0 and sum(d > 0 for d in record["delays"]) > 30


def test_one_worker_over_rpc_is_sequential_sgd(tmp_path):
    codes, record = run_ps(tmp_path, "dcasgd-a", 1, 30)
    assert codes == [0, 0] and record["delays"] == [0] * 30
    expected = tiny_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.02)
    for i in range(30):
        optimizer.zero_grad()
        mse_step(expected, regression_batch(i)).backward()
        optimizer.step()
    assert record["weights"] == [p.detach().flatten().tolist() for p in expected.parameters()]


def test_a_worker_killed_mid_run_leaves_the_others_to_finish(tmp_path):
    """Worker 1 (rank 2) is SIGKILLed at its 10th gradient: the server takes it as lost after the timeout, and the
    other two carry the run to its last update (each synchronous round then waits for the living only)."""
    codes, record = run_ps(tmp_path, "ssgd", 3, 150, kill_rank=2, worker_timeout=2.0)
    assert codes[2] == -signal.SIGKILL and codes[:2] + codes[3:] == [0, 0, 0]
    assert record["updates"] == 150 and record["lost"] == [1]
    assert record["workers"].count(1) < 10 and set(record["workers"][-20:]) == {0, 2}


def test_a_worker_whose_step_raises_is_lost_at_once(tmp_path):
    """It tells the server before it exits: the others finish without waiting out ps_worker_timeout (600 s here,
    longer than the test's own limit)."""
    codes, record = run_ps(tmp_path, "ssgd", 3, 60, kill_rank=2, worker_timeout=600.0, how="FAIL_AFTER")
    assert codes[2] == 1 and codes[:2] + codes[3:] == [0, 0, 0]
    assert record["updates"] == 60 and record["lost"] == [1]
