"""The order a run reads its examples in: shuffled per epoch, sharded by rank, cut into optimizer steps."""
from __future__ import annotations

import math
import random

from danlu.training.topology import Topology


SHUFFLES = ("global", "local")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def accumulation_groups(order: list[int], batch_size: int, accumulation: int) -> list[list[list[int]]]:
    """The optimizer steps of an epoch: each a list of micro-batches (lists of example indices)."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
    return [g for g in groups if len(g) == accumulation] or groups[:1]


def shard_order(n: int, seed: int, epoch: int, topology: Topology, shuffle: str = "global") -> list[int]:
    """This rank's examples of an epoch, in order. global: the whole set shuffled anew each epoch and split among
    the data-parallel ranks; local: split once (epoch 0's order), each rank shuffling its own shard per epoch."""
    if shuffle == "global":
        return topology.shard(epoch_order(n, seed, epoch))
    shard = topology.shard(epoch_order(n, seed, 0))
    if epoch:
        random.Random((seed * 1000 + epoch) * 1000 + topology.data_parallel_rank).shuffle(shard)
    return shard


def epoch_plan(n_examples: int, seed: int, epoch: int, batch_size: int, accumulation: int,
               topology: Topology, shuffle: str = "global") -> tuple[list[list[list[int]]], int]:
    """This rank's optimizer steps of an epoch, and how many micro-batches the epoch has."""
    order = shard_order(n_examples, seed, epoch, topology, shuffle)
    return accumulation_groups(order, batch_size, accumulation), math.ceil(len(order) / batch_size)


def steps_for_epochs(n_examples: int, epochs: float, batch_size: int, accumulation: int,
                     topology: Topology = Topology()) -> int:
    batches = math.ceil(len(topology.shard(range(n_examples))) / batch_size)
    return math.ceil(max(1, batches // accumulation) * epochs)
