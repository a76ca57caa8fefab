"""The process group torchrun's processes join, and the device mesh that names its dimensions.

One process group per run (gloo on the CPU, nccl on GPUs), made once and destroyed when the run ends; the
mesh lays the ranks out as pp x dp x fsdp x tp (torchtitan's order: the innermost dimension, tensor
parallel, on neighbouring ranks, which share a machine) so that each transform takes its own sub-mesh:
`mesh["fsdp"]`, `mesh["dp", "fsdp"]`, `mesh["tp"]`.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from danlu.distributed.layout import ParallelLayout

MESH_DIMENSIONS = ("pp", "dp", "fsdp", "tp")
BACKENDS = ("gloo", "nccl")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, backend: Optional[str] = None,
                       timeout_seconds: Optional[int] = None) -> None:
    """Join the job torchrun describes in the environment (MASTER_ADDR, RANK, ...); a no-op once joined."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_seconds) if timeout_seconds else None
    dist.init_process_group(backend or default_backend(device), timeout=timeout)


def build_mesh(layout: ParallelLayout, device: torch.device) -> DeviceMesh:
    """The ranks as a pp x dp x fsdp x tp mesh with named dimensions (size 1 where the layout has none)."""
    if layout.world_size != dist.get_world_size():
        raise ValueError(f"layout {layout} needs {layout.world_size} processes; the process group has "
                         f"{dist.get_world_size()}")
    return init_device_mesh(device.type, tuple(getattr(layout, name) for name in MESH_DIMENSIONS),
                            mesh_dim_names=MESH_DIMENSIONS)


@contextmanager
def process_group(device: torch.device, backend: Optional[str] = None,
                  timeout_seconds: Optional[int] = None) -> Iterator[None]:
    """The job's process group inside the block; destroyed on the way out, error or not."""
    init_process_group(device, backend, timeout_seconds)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def distributed(layout: ParallelLayout, device: torch.device, backend: Optional[str] = None,
                timeout_seconds: Optional[int] = None) -> Iterator[DeviceMesh]:
    """The run's mesh inside the block; the process group is destroyed on the way out, error or not."""
    with process_group(device, backend, timeout_seconds):
        yield build_mesh(layout, device)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks that read different data, as a 1-D mesh: the dp x fsdp sub-mesh this rank sits in, flattened
    (its local rank is this rank's data-parallel rank; the ranks of one tensor-parallel group share it). A
    collective: every rank calls it, once per mesh."""
    return mesh["dp", "fsdp"]._flatten()
