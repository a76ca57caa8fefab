"""Where this process sits in a training run: rank, world size and device. One process is world size 1.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; each rank reads its own share of every epoch's data order,
and only the main rank writes files, logs and progress bars.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not within world_size {self.world_size}")

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
        """This rank's share of a data order: every world_size-th item, all shares of equal length."""
        usable = len(order) - len(order) % self.world_size
        return list(order[self.rank:usable:self.world_size])
