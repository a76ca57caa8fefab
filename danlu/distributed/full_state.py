"""Whole tensors from FSDP2 and tensor-parallel shards (DTensors) and back, for the files a run writes and
resumes from.

While parameters, gradients and optimizer state are sharded DTensors, checkpoints and the Hugging Face export
still hold whole tensors, in the same layout one process writes: the main rank gathers them (on the CPU),
the others take part in the gather and keep nothing. Loading distributes the whole tensors back as shards.
Each function here that gathers is a collective: every rank calls it, in the same order. Whole tensors are what
let a run saved in one layout resume in another (dp=2 -> one process, tp=2 -> fsdp=2, ...: the optimizer state's
parameter indices and shapes are those of one process in every layout).

TODO (a later part of issue 13): torch.distributed.checkpoint's sharded format, so that no rank needs the
whole state.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (FSDP2 or tensor parallel), i.e. no rank holds it whole."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors on the CPU of rank 0 (an empty dict elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (the same on every rank) into the model's shards; names it lacks are an error, names
    the state lacks are left as they are."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each sharded tensor gathered whole: on rank 0 what one process would save
    (the same keys and parameter indices), an empty dict elsewhere."""
    saved = optimizer.state_dict()
    main = dist.get_rank() == 0
    state = {}
    for index, values in saved["state"].items():
        whole = {key: _gathered(value) for key, value in values.items()}
        if main:
            state[index] = whole
    return {"state": state, "param_groups": saved["param_groups"]} if main else {}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After optimizer.load_state_dict() of whole tensors: each per-element state (Adam's moments: the shape
    of its parameter) becomes a shard laid out as its DTensor parameter; scalars (the step) stay as they are."""
    for param, values in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in values.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                values[key] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)


@contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, on rank 0, every sharded parameter of `model` is replaced by its whole tensor (on the CPU), so
    that code written for one process (the HF and PEFT writers) reads the whole model. The shards are put back
    on the way out. Training must not run inside."""
    if not is_sharded(model):
        yield
        return
    full = full_model_state(model)
    swapped, whole = [], {}  # whole: by id of the shard, so that tied weights stay one tensor
    if dist.get_rank() == 0:
        for module_name, module in model.named_modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    key = f"{module_name}.{name}" if module_name else name
                    if id(param) not in whole:
                        whole[id(param)] = nn.Parameter(full[key], requires_grad=param.requires_grad)
                    module._parameters[name] = whole[id(param)]
                    swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _gathered(value):
    """A DTensor gathered whole onto the CPU of rank 0 (None elsewhere); anything else as it is."""
    if not isinstance(value, DTensor):
        return value
    whole = value.full_tensor()
    return whole.cpu() if dist.get_rank() == 0 else None
