"""The RPC group of a parameter-server run: rank 0 is the server ("ps"), ranks 1..K the workers ("worker0"...).

torch.distributed.rpc (TensorPipe) carries the calls; it rendezvous as the process group does (MASTER_ADDR,
MASTER_PORT, as torchrun sets them). The functions workers call remotely are module-level (RPC pickles them by
name) and reach the server object of their process. Shutdown is not graceful: a graceful one waits for every
process, and a lost worker would hold it forever; the server instead waits for each living worker's `finish`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch.distributed.rpc as rpc

from danlu.distributed.parameter_server.server import ParameterServer

SERVER_NAME = "ps"
_server: Optional[ParameterServer] = None


def worker_name(worker: int) -> str:
    return f"worker{worker}"


def process_name(rank: int) -> str:
    return SERVER_NAME if rank == 0 else worker_name(rank - 1)


@contextmanager
def rpc_group(rank: int, world_size: int, timeout_seconds: float = 600.0) -> Iterator[None]:
    """Join the run's RPC group as the server (rank 0) or worker rank - 1; left when the block ends."""
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=max(16, 2 * world_size + 4),
                                              rpc_timeout=timeout_seconds)
    rpc.init_rpc(process_name(rank), rank=rank, world_size=world_size, rpc_backend_options=options)
    try:
        yield
    finally:
        rpc.shutdown(graceful=False)


@contextmanager
def serving(server: ParameterServer) -> Iterator[ParameterServer]:
    """Inside the block, workers' calls reach `server`."""
    global _server
    _server = server
    try:
        yield server
    finally:
        _server = None


def _reach() -> ParameterServer:
    if _server is None:
        raise RuntimeError("this process serves no parameter server")
    return _server


def remote_pull(worker: int):
    return _reach().pull(worker)


def remote_push(worker: int, grads, pulled: int, loss: float, n_tokens: int) -> bool:
    return _reach().push(worker, grads, pulled, loss, n_tokens)


def remote_heartbeat(worker: int) -> None:
    _reach().heartbeat(worker)


def remote_finish(worker: int) -> None:
    _reach().finish(worker)


def remote_fail(worker: int, reason: str) -> None:
    _reach().fail(worker, reason)
