"""A parameter-server worker: pull the weights, compute a gradient on the next batch, push it; until told to stop.

The worker runs freely (no barrier but the server's, under ssgd). A thread sends a heartbeat every few seconds so
that a long gradient computation is not taken for a lost worker.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch
import torch.distributed.rpc as rpc

from danlu.distributed.parameter_server.group import (SERVER_NAME, remote_fail, remote_finish, remote_heartbeat,
                                                      remote_pull, remote_push)

# Computes the gradient of the worker's next batch into the parameters' .grad; returns (loss, tokens seen).
Gradient = Callable[[], tuple[float, int]]


def work(worker: int, parameters: Sequence[torch.nn.Parameter], gradient: Gradient,
         heartbeat_seconds: float = 2.0) -> int:
    """Run worker `worker` until the server stops it; the number of gradients it pushed."""
    parameters = list(parameters)
    stop_beating = threading.Event()
    beating = threading.Thread(target=_beat, args=(worker, heartbeat_seconds, stop_beating), daemon=True)
    beating.start()
    pushed = 0
    try:
        while True:
            version, weights = rpc.rpc_sync(SERVER_NAME, remote_pull, args=(worker,))
            if weights is None:
                break
            with torch.no_grad():
                for p, w in zip(parameters, weights):
                    p.copy_(w)
            loss, n_tokens = gradient()
            grads = [torch.zeros_like(p, device="cpu") if p.grad is None else p.grad.detach().cpu()
                     for p in parameters]
            for p in parameters:
                p.grad = None
            pushed += 1
            if not rpc.rpc_sync(SERVER_NAME, remote_push, args=(worker, grads, version, loss, n_tokens)):
                break
    except Exception as e:  # tell the server at once, so that it does not wait out ps_worker_timeout
        _tell_failure(worker, e)
        raise
    finally:
        stop_beating.set()
        beating.join()
    try:
        rpc.rpc_sync(SERVER_NAME, remote_finish, args=(worker,))
    except RuntimeError:
        # the server stops once it has every living worker's finish, and may be gone before its reply reaches us
        pass
    return pushed


def _tell_failure(worker: int, error: Exception) -> None:
    try:
        rpc.rpc_sync(SERVER_NAME, remote_fail, args=(worker, f"{type(error).__name__}: {error}"[:500]), timeout=10)
    except RuntimeError:
        pass  # the server is gone too (or the error was the server's own, reported by the call that failed)


def _beat(worker: int, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            rpc.rpc_sync(SERVER_NAME, remote_heartbeat, args=(worker,), timeout=every * 10)
        except RuntimeError:  # the server is gone or busy; the main loop's next call will say which
            return
