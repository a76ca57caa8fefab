"""A preallocated key/value cache: one [batch, kv_heads, capacity, head_dim] pair per layer."""
from __future__ import annotations

import torch

from danlu.models.config import ModelConfig


def kv_values_per_token(config: ModelConfig) -> int:
    """Numbers a KV cache holds per token: a key and a value per layer, per key/value head, of head_dim each."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


def layer_buffers(config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device,
                  make=torch.empty) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values, one [batch, kv_heads, capacity, head_dim] tensor per layer each, made by `make`."""
    shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
    return ([make(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)],
            [make(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)])


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.keys, self.values = layer_buffers(config, batch_size, capacity, dtype, device, torch.empty)
        self.capacity = capacity
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values for a layer and return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} were asked for")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class StaticKVCache:
    """A KV cache whose shapes never change, for a decode step compiled once (torch.compile).

    Every forward writes its keys/values at the columns `place` last named, and attention reads all `capacity`
    columns: the caller's 4-D mask hides those not written yet. Nothing in it changes shape, and no Python
    number changes between steps (`advance` does nothing: the caller places each step), so one traced step
    serves them all. Zeros, not empty memory: a masked position still enters the value sum as 0 x value, and
    uninitialised memory may hold NaN.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.keys, self.values = layer_buffers(config, batch_size, capacity, dtype, device, torch.zeros)
        self.capacity = capacity
        self.columns = torch.zeros(1, dtype=torch.long, device=device)

    def place(self, start: int, count: int = 1) -> torch.Tensor:
        """The next forward's `count` tokens go to columns start, start + 1, ...; returns those columns."""
        if start + count > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {start + count} were asked for")
        self.columns = torch.arange(start, start + count, device=self.columns.device)
        return self.columns

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer].index_copy_(2, self.columns, k)
        self.values[layer].index_copy_(2, self.columns, v)
        return self.keys[layer], self.values[layer]

    def advance(self, steps: int) -> None:
        pass
