"""Start a parameter-server run's processes on this machine without torchrun (experiments, tests).

Each process runs `target(rank, world_size, *args)` (a module-level function: the processes are spawned, not
forked) with MASTER_ADDR/MASTER_PORT pointing at a free local port, as torchrun would set them. Processes are
independent: one that dies does not take the others down (torchrun, by contrast, stops the whole group when one
of its workers fails).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Callable, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(target: Callable, rank: int, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    target(rank, world_size, *args)


def run_locally(target: Callable, world_size: int, args: tuple = (), timeout: Optional[float] = None) -> list:
    """Run `target` in `world_size` processes; their exit codes (None for one still running `timeout` seconds
    after the start, which is then killed)."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_enter, args=(target, rank, world_size, port, args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    codes = []
    for process in processes:
        process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
            codes.append(None)
        else:
            codes.append(process.exitcode)
    return codes
