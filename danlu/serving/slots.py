"""A KV cache of fixed slots for continuous batching: each running request owns one row, with its own length.

`view(rows)` gives the model the usual cache interface (length / update / advance) over some rows, so
requests of different lengths decode together and join or leave between steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from danlu.generation.kv_cache import layer_buffers
from danlu.models.config import ModelConfig


class SlotKVCache:
    def __init__(self, config: ModelConfig, slots: int, capacity: int, dtype: torch.dtype, device):
        # empty, not zeros: the operating system commits memory only for the positions requests really use
        self.keys, self.values = layer_buffers(config, slots, capacity, dtype, device, torch.empty)
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.capacity = capacity

    def view(self, rows: list[int], new_tokens: Optional[list[int]] = None) -> "SlotView":
        return SlotView(self, rows, new_tokens)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0


class SlotView:
    """The rows of a SlotKVCache that take part in one forward pass. `new_tokens`: how many of the forward's
    tokens are real in each row (right-padded prefill); its lengths advance by those only. Default: all."""

    def __init__(self, cache: SlotKVCache, rows: list[int], new_tokens: Optional[list[int]] = None):
        self.cache = cache
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.new_tokens = None if new_tokens is None else torch.tensor(new_tokens, dtype=torch.long)
        self.row_lengths = cache.lengths[self.rows].clone()
        self.length = int(self.row_lengths.max())  # the model's "past": every row's keys fit below it
        device = cache.keys[0].device
        self._device_rows = self.rows.to(device)
        self._device_lengths = self.row_lengths.to(device)
        # [rows, 1, length, 1]: True where a shorter row's past is padding. Those positions are masked from
        # attention, but the memory is uninitialised (or an earlier request's): NaN there would still give
        # 0 * NaN = NaN in the value sum, so they are zeroed in what the model sees.
        past_padding = torch.arange(self.length)[None, :] >= self.row_lengths[:, None]
        self._past_padding = past_padding[:, None, :, None].to(device) if bool(past_padding.any()) else None

    def attention_mask(self, new_tokens: int) -> torch.Tensor:
        """[rows, length + new]: 1 where a row has a key (its own past and the new tokens)."""
        total = self.length + new_tokens
        index = torch.arange(total)
        past = index[None, :] < self.row_lengths[:, None]
        new = (index[None, :] >= self.length) & (index[None, :] < total)
        return (past | new).long().to(self._device_rows.device)

    def position_ids(self, new_tokens: int) -> torch.Tensor:
        return (self._device_lengths[:, None] + torch.arange(new_tokens, device=self._device_lengths.device)[None])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write each row's new keys at its own length; return keys laid out as [past (padded) | new]."""
        new = k.shape[2]
        if self.length + new > self.cache.capacity:
            raise ValueError(f"slot cache holds {self.cache.capacity} positions; {self.length + new} needed")
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if len(self.rows) == 1 or new > 1:  # a prefill: one contiguous write per row
            for j, (row, start) in enumerate(zip(self.rows.tolist(), self.row_lengths.tolist())):
                keys[row, :, start:start + new] = k[j]
                values[row, :, start:start + new] = v[j]
        else:
            for step in range(new):
                keys[self._device_rows, :, self._device_lengths + step] = k[:, :, step]
                values[self._device_rows, :, self._device_lengths + step] = v[:, :, step]
        # slice to the used length first, so only that much is gathered
        past_k = keys[:, :, :self.length].index_select(0, self._device_rows)
        past_v = values[:, :, :self.length].index_select(0, self._device_rows)
        if self._past_padding is not None:
            past_k = past_k.masked_fill(self._past_padding, 0)
            past_v = past_v.masked_fill(self._past_padding, 0)
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)

    def advance(self, steps: int) -> None:
        self.cache.lengths[self.rows] = self.row_lengths + (steps if self.new_tokens is None else self.new_tokens)
