"""Train any nn.Module with a step function on a parameter server: rank 0 serves, ranks 1..K work.

Every process builds the same model; the server's copy is the one trained (its trainable parameters are what is
pulled and pushed), the workers' copies only compute gradients. `danlu train --parallel ps=K` and the
experiments in bench/ both run through `run_parameter_server`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from danlu.distributed.parameter_server.group import rpc_group, serving
from danlu.distributed.parameter_server.server import OnUpdate, ParameterServer
from danlu.distributed.parameter_server.worker import work


@dataclass(frozen=True)
class ServerSettings:
    max_updates: int
    rule: str = "asgd"  # ssgd | asgd | dcasgd-c | dcasgd-a
    dc_lambda: float = 0.04
    dc_momentum: float = 0.95
    delay: int = 0  # injected staleness: workers compute on the weights of `delay` updates ago
    worker_timeout: float = 60.0  # seconds without a word before a worker is taken as lost
    max_grad_norm: float = 0.0  # > 0: the server clips the gradient it steps on to this global norm
    rpc_timeout: float = 600.0


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# Computes the gradient of `batch` into the model's .grad; returns (loss, tokens seen)
GradientOf = Callable[[torch.nn.Module, Any], tuple[float, int]]


def step_gradient(step: Callable) -> GradientOf:
    """The GradientOf a step function that returns a loss tensor or a StepOutput (backward on its loss)."""
    def gradient_of(model: torch.nn.Module, batch) -> tuple[float, int]:
        out = step(model, batch)
        loss = out if torch.is_tensor(out) else out.loss
        loss.backward()
        return loss.item(), 0 if torch.is_tensor(out) else out.n_tokens
    return gradient_of


def run_parameter_server(rank: int, world_size: int, model: torch.nn.Module, settings: ServerSettings,
                         build_optimizer: Callable[[torch.nn.Module], tuple],
                         batches: Callable[[int], Iterator], gradient_of: GradientOf,
                         on_update: Optional[OnUpdate] = None, version: int = 0,
                         prepare_server: Optional[Callable[[ParameterServer], None]] = None
                         ) -> Optional[ParameterServer]:
    """Rank 0: serve until settings.max_updates updates are applied; the server (its pushes, lost workers; the
    model is trained in place). Ranks 1..K: be worker rank - 1, computing `gradient_of(model, batch)` on `batches(worker)` (an
    endless iterator); None. `build_optimizer(model)` gives the server's (optimizer, scheduler or None)."""
    if world_size < 2:
        raise ValueError("a parameter-server run needs the server and at least one worker (world size >= 2)")
    if rank == 0:
        optimizer, scheduler = build_optimizer(model)
        server = ParameterServer(trainable_parameters(model), optimizer, world_size - 1, settings.max_updates,
                                 settings.rule, scheduler, settings.dc_lambda, settings.dc_momentum, settings.delay,
                                 settings.worker_timeout, on_update, version, settings.max_grad_norm)
        if prepare_server is not None:
            prepare_server(server)
        with serving(server), rpc_group(rank, world_size, settings.rpc_timeout):
            server.start_clock()
            server.wait()
        return server
    stream = batches(rank - 1)
    with rpc_group(rank, world_size, settings.rpc_timeout):
        work(rank - 1, trainable_parameters(model), lambda: gradient_of(model, next(stream)))
    return None
