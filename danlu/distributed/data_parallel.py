"""Data parallel from outside the model: replicated (DDP) and sharded (FSDP2), torchtitan's `apply_ddp` and
`apply_fsdp`. Each process reads its own share of every global batch; the gradients are averaged over the
replicas in the backward pass, so every rank takes the same optimizer step.

- `apply_ddp`: every rank holds the whole model and optimizer state; the gradients are all-reduced
  (`torch.distributed._composable.replicate`, DistributedDataParallel without the wrapper, so that parameter
  names and attributes stay the model's own).
- `apply_fsdp`: FSDP2's `fully_shard` on each transformer block, then on the root (embeddings, final norm,
  head and whatever else the stage hung on the model, e.g. a value head). Parameters, gradients and
  optimizer state are DTensors sharded over the mesh; a block's parameters are all-gathered just before
  it runs and its gradients reduce-scattered after. Frozen parameters (LoRA's base weights) are sharded too
  and get no gradient. With a 2-D ("dp", "fsdp") mesh it is HSDP: sharded within fsdp, replicated across dp.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from danlu.distributed.layout import ParallelLayout


def apply_ddp(model: nn.Module, mesh: DeviceMesh, find_unused_parameters: bool = False) -> nn.Module:
    """Replicate `model` over the (1-D) mesh: gradients all-reduced (averaged) in backward."""
    return replicate(model, device_mesh=mesh, find_unused_parameters=find_unused_parameters)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` over the mesh, each transformer block a unit of its own, the root the rest.

    The last block is not resharded after the forward pass: the backward pass starts with it at once
    (torchtitan's choice)."""
    blocks = list(model.model.layers)
    for index, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and index < len(blocks) - 1)
    # What a stage hangs on the model and calls after its forward (a value head, distillation's projections) is a
    # unit of its own, gathered when it is called: the root's weights are resharded once the model's forward ends.
    for name, child in model.named_children():
        if name not in ("model", "lm_head", "pooler"):
            fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, layout: ParallelLayout,
                        find_unused_parameters: bool = False) -> nn.Module:
    """The layout's data parallelism: FSDP2 when fsdp > 1 (HSDP when dp > 1 too), else DDP when dp > 1.

    A tensor-parallel model (its parameters DTensors over mesh["tp"]) is replicated over dp by FSDP2's HSDP
    with fsdp = 1 (sharded over one rank, replicated over dp): composable replicate() does not take DTensor
    parameters (it leaves the model with none), as torchtitan's apply_ddp refuses a mesh of more than one
    dimension. So is a pipeline stage: a pipeline runs several forward passes before their backward passes,
    which DDP's reducer does not follow (its gradients came out wrong), while the pipeline schedules drive
    FSDP2's gradient reduction themselves."""
    if layout.fsdp > 1 or (layout.dp > 1 and (layout.tp > 1 or layout.pp > 1)):
        return apply_fsdp(model, mesh["dp", "fsdp"] if layout.dp > 1 else mesh["fsdp"],
                          layout.reshard_after_forward)
    if layout.dp > 1:
        return apply_ddp(model, mesh["dp"], find_unused_parameters)
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Under DDP, backward passes inside average their gradients over the replicas only if `enabled`: all
    micro-batches of an accumulation step but the last keep theirs local (DDP's no_sync). FSDP2 reduce-scatters
    every micro-batch regardless: skipping it would hold unsharded gradients, the memory FSDP exists to save."""
    toggle = None if isinstance(model, FSDPModule) else getattr(model, "set_requires_gradient_sync", None)
    if toggle is not None:
        toggle(enabled)
    try:
        yield
    finally:
        if toggle is not None:
            toggle(True)
