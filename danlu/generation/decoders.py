"""The model side of `decode_steps`: run the prompts, then one token per live row per step.

Two ways, the same logits (to float rounding):
* `CacheDecoder` (decoding "dynamic", the default): the KV cache grows by a column per step and rows that finish
  leave the batch, so every step computes exactly what is needed. Its shapes change every step.
* `StaticDecoder` (decoding "static", or "compiled" = the same step under torch.compile): a cache of fixed capacity
  (`StaticKVCache`), a mask over all of it, finished rows kept in the batch (their tokens ignored). The step's
  shapes never change, so torch.compile traces it once (gpt-fast's recipe) and fuses the small operations around
  the matrix products; on CUDA the static shapes are what CUDA graphs need too. Attention reads the whole
  capacity, so the capacity is rounded up to a power of two (fewer recompilations, at most twice the keys).

Both take left-padded prompts: a row of length n in a batch of longest L starts at column L - n.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from danlu.generation.kv_cache import KVCache, StaticKVCache
from danlu.models.transformer import causal_mask

DECODINGS = ("dynamic", "static", "compiled")
SMALLEST_STATIC_CAPACITY = 256


def make_decoder(model, prompts: Sequence[Sequence[int]], pad_id: int, max_new: int, decoding: str = "dynamic"):
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {list(DECODINGS)}, got {decoding!r}")
    if decoding == "dynamic":
        return CacheDecoder(model, prompts, pad_id, max_new)
    return StaticDecoder(model, prompts, pad_id, max_new, compiled=decoding == "compiled")


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, list[int]]:
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    pads = [longest - len(p) for p in prompts]
    for i, p in enumerate(prompts):
        input_ids[i, pads[i]:] = torch.tensor(list(p), dtype=torch.long)
    return input_ids, pads


class CacheDecoder:
    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_id: int, max_new: int):
        parameter = next(model.parameters())
        self.model, self.device = model, parameter.device
        self.input_ids, pads = _left_padded(prompts, pad_id, self.device)
        batch, longest = self.input_ids.shape
        self.mask = torch.zeros((batch, longest + max_new), dtype=torch.long, device=self.device)
        for i, pad in enumerate(pads):
            self.mask[i, pad:longest] = 1
        self.padded = any(pads)
        self.cache = KVCache(model.config, batch, longest + max_new, parameter.dtype, self.device)

    def prefill(self) -> torch.Tensor:
        """Logits [batch, vocab] after each prompt."""
        longest = self.input_ids.shape[1]
        return self.model(self.input_ids, attention_mask=self.mask[:, :longest] if self.padded else None,
                          kv_cache=self.cache, last_only=True)[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        """Only these rows (of those still running) go on."""
        self.cache.select_rows(index)
        self.mask = self.mask[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row; logits [rows, vocab] after it."""
        length = self.cache.length + 1
        self.mask[:, length - 1] = 1
        return self.model(tokens[:, None], attention_mask=self.mask[:, :length] if self.padded else None,
                          kv_cache=self.cache)[:, -1]


def static_capacity(needed: int, context: int) -> int:
    """The cache capacity for `needed` positions: the next power of two from SMALLEST_STATIC_CAPACITY, at most
    the context window (which needed never exceeds)."""
    capacity = SMALLEST_STATIC_CAPACITY
    while capacity < needed:
        capacity *= 2
    return max(needed, min(capacity, context))


@functools.cache
def compiled_forward():
    """One compiled forward for every model and cache: torch.compile guards on the shapes and recompiles for new
    ones (another batch size, capacity or model), up to torch._dynamo.config.cache_size_limit of them."""
    return torch.compile(_forward, dynamic=False)


def _forward(model, ids, mask, positions, cache):
    return model(ids, attention_mask=mask, position_ids=positions, kv_cache=cache)


class StaticDecoder:
    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_id: int, max_new: int, compiled: bool = False):
        parameter = next(model.parameters())
        self.model, self.device = model, parameter.device
        self.input_ids, pads = _left_padded(prompts, pad_id, self.device)
        batch, self.column = self.input_ids.shape
        capacity = static_capacity(self.column + max_new, model.config.max_position_embeddings)
        self.cache = StaticKVCache(model.config, batch, capacity, parameter.dtype, self.device)
        self.pads = torch.tensor(pads, device=self.device)
        self.valid = torch.arange(capacity, device=self.device)[None, :] >= self.pads[:, None]  # False on padding
        self.live = torch.arange(batch, device=self.device)  # rows of the batch still running
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.forward = compiled_forward() if compiled else _forward

    def _mask(self, queries: torch.Tensor) -> torch.Tensor:
        """[batch, 1, queries, capacity]: the model's causal mask over the cache's columns."""
        return causal_mask(queries, self.valid.shape[1], self.model.config.sliding_window, self.valid)

    def _positions(self, columns: torch.Tensor) -> torch.Tensor:
        return (columns[None, :] - self.pads[:, None]).clamp(min=0)

    def prefill(self) -> torch.Tensor:
        columns = self.cache.place(0, self.column)
        return self.model(self.input_ids, attention_mask=self._mask(columns), position_ids=self._positions(columns),
                          kv_cache=self.cache, last_only=True)[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        self.live = self.live[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        columns = self.cache.place(self.column)
        self.tokens[self.live, 0] = tokens
        logits = self.forward(self.model, self.tokens, self._mask(columns), self._positions(columns), self.cache)
        self.column += 1
        return logits[self.live, -1]
