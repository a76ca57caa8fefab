"""Aggregating the local models of K workers that train apart for a while (MSRA, seed 003; Sun et al., 2017).

- average: parameter averaging (local SGD, model averaging): every worker takes the mean of the K models. For a
  convex loss the averaged model is no worse than the models' mean loss; for a network it can be much worse,
  the more so the longer the workers trained apart.
- ensemble: the mean of the K models' predicted distributions, which a convex loss in the outputs (cross-entropy)
  keeps no worse than the models' mean loss, distilled back into each worker's model of the local size
  (ensemble-compression): each worker relabels its next batches with the ensemble and trains on its labels and
  the ensemble's (the KD loss of danlu.distillation), the compression folded into local training.

Collectives over a torch.distributed process group (gloo on the CPU, nccl on GPUs); the parameters exchanged are
the trainable ones (a LoRA run exchanges its adapters only).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

AGGREGATIONS = ("average", "ensemble")


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def average_parameters(parameters: Sequence[torch.Tensor], group=None) -> None:
    """Every worker's `parameters` become the mean over the group's workers (in place)."""
    world = dist.get_world_size(group)
    for p in parameters:
        dist.all_reduce(p.data, op=dist.ReduceOp.SUM, group=group)
        p.data.div_(world)


@torch.no_grad()
def gather_parameters(parameters: Sequence[torch.Tensor], group=None) -> list[list[torch.Tensor]]:
    """Every worker's values of `parameters`, in rank order (this worker's own among them)."""
    world = dist.get_world_size(group)
    members: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for p in parameters:
        gathered = [torch.empty_like(p.data) for _ in range(world)]
        dist.all_gather(gathered, p.data.contiguous(), group=group)
        for member, value in zip(members, gathered):
            member.append(value)
    return members


class Ensemble(nn.Module):
    """K models of one architecture that differ in their trainable parameters, as one frozen predictor: its
    logits are the log of the mean of the members' softmax distributions (a teacher for the KD loss: at
    temperature 1 its soft labels are the ensemble's distribution). One copy of the model (sharing the frozen
    parameters) computes every member, their trainable parameters loaded in turn; without members it has nothing
    to say (`members` empty)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        names = trainable_names(model)
        # the frozen parameters (a LoRA run's base) are shared with `model`, not copied: only the trained differ
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=shared).eval().requires_grad_(False)
        own = dict(self.model.named_parameters())
        self.slots = [own[name] for name in names]
        self.members: list[list[torch.Tensor]] = []

    def set_members(self, members: list[list[torch.Tensor]]) -> None:
        for index, member in enumerate(members):
            if len(member) != len(self.slots):
                raise ValueError(f"ensemble member {index} has {len(member)} parameters; the model trains "
                                 f"{len(self.slots)}")
            for slot, value in zip(self.slots, member):
                if value.shape != slot.shape:  # copy_ would broadcast some wrong shapes silently
                    raise ValueError(f"ensemble member {index}: a parameter of shape {tuple(value.shape)} where "
                                     f"the model has {tuple(slot.shape)}")
        self.members = members

    def train(self, mode: bool = True) -> "Ensemble":
        return super().train(False)  # always frozen, whatever the loop asks

    @torch.no_grad()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        if not self.members:
            raise RuntimeError("the ensemble has no members yet: gather the workers' models first")
        total: Optional[torch.Tensor] = None
        for member in self.members:
            for slot, value in zip(self.slots, member):
                slot.copy_(value)
            probabilities = torch.softmax(self.model(*args, **kwargs).float(), dim=-1)
            total = probabilities if total is None else total + probabilities
        return (total / len(self.members)).log()
