"""Where this process sits in a training run: rank, world size and device. One process is world size 1.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; only the main rank writes files, logs and progress bars.
The ranks that read different data are the data-parallel ones (dp x fsdp): each reads its own share of every
epoch's data order, while the ranks of one tensor-parallel group read the same examples. Without a parallel
layout every rank is a data-parallel replica (the data-parallel rank and size are the rank and world size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_parallel_rank: Optional[int] = None  # among the ranks reading different data (dp x fsdp); None: rank
    data_parallel_size: Optional[int] = None  # how many read different data; None: world_size
    # the process group of the data-parallel ranks this one sums its loss with; None: the default (world) group
    data_parallel_group: Optional[Any] = field(default=None, repr=False, compare=False)
    # the data-parallel ranks train local models apart (each its own loss and steps; aggregated now and then)
    apart: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not within world_size {self.world_size}")
        if self.data_parallel_rank is None:
            object.__setattr__(self, "data_parallel_rank", self.rank)
        if self.data_parallel_size is None:
            object.__setattr__(self, "data_parallel_size", self.world_size)
        if self.world_size % self.data_parallel_size or not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data-parallel rank {self.data_parallel_rank} of size {self.data_parallel_size} does "
                             f"not fit world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None) -> "Topology":
        """The topology torchrun describes in the environment (world size 1 without it)."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return cls(rank, world, local_rank, torch.device(device))

    def shard(self, order: Sequence[int]) -> list[int]:
        """This rank's share of a data order: every data_parallel_size-th item, all shares of equal length (the
        same share on every rank of a tensor-parallel group)."""
        usable = len(order) - len(order) % self.data_parallel_size
        return list(order[self.data_parallel_rank:usable:self.data_parallel_size])
