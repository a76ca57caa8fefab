"""Automatic prefix caching (vLLM's idea): the keys and values of a prompt's leading blocks are kept after its
prefill (and of its answer's, when it finishes), so a later prompt that begins with the same tokens (the chat
template's system prompt, a few-shot preamble, the earlier turns of a conversation) copies them into its slot and
prefills only the rest.

A block is `block_size` tokens. It is found by a digest of everything up to its end (its parent block's digest and
its own tokens) and of the adapter, so the same tokens after a different beginning, or under another adapter, never
match. Only blocks strictly before the prompt's last token are cached: that token is always computed, since its
logits start the answer. When the cache holds `max_blocks`, the least recently used blocks go first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from danlu.serving.slots import SlotKVCache


class PrefixCache:
    def __init__(self, block_size: int = 16, max_blocks: int = 512):
        if block_size < 1 or max_blocks < 1:
            raise ValueError(f"block_size and max_blocks must be positive, got {block_size} and {max_blocks}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        # digest -> (keys, values), each [layers, kv_heads, block_size, head_dim]; oldest use first
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    def digests(self, prompt: Sequence[int], adapter: Optional[str]) -> list[bytes]:
        """One digest for each full block before the prompt's last token."""
        parent = hashlib.sha256(f"adapter:{adapter}".encode()).digest()
        digests = []
        for end in range(self.block_size, len(prompt), self.block_size):
            block = prompt[end - self.block_size:end]
            parent = hashlib.sha256(parent + b"".join(int(t).to_bytes(4, "little") for t in block)).digest()
            digests.append(parent)
        return digests

    def restore(self, cache: SlotKVCache, slot: int, prompt: Sequence[int], adapter: Optional[str]) -> int:
        """Copy the longest cached beginning of `prompt` into `slot` (reset); return how many tokens it covers."""
        found = []
        for digest in self.digests(prompt, adapter):
            block = self.blocks.get(digest)
            if block is None:
                break
            start = len(found) * self.block_size
            for layer, (keys, values) in enumerate(zip(*block)):
                cache.keys[layer][slot, :, start:start + self.block_size] = keys
                cache.values[layer][slot, :, start:start + self.block_size] = values
            found.append(digest)
        self._touch(found)
        cached = len(found) * self.block_size
        cache.lengths[slot] = cached
        self.queried_tokens += len(prompt)
        self.hit_tokens += cached
        return cached

    def store(self, cache: SlotKVCache, slot: int, prompt: Sequence[int], adapter: Optional[str]) -> None:
        """Keep the blocks of `prompt` (prefilled into `slot`) that the cache does not hold yet."""
        digests = self.digests(prompt, adapter)[:self.max_blocks]
        for index, digest in enumerate(digests):
            if digest not in self.blocks:
                span = slice(index * self.block_size, (index + 1) * self.block_size)
                self.blocks[digest] = (torch.stack([k[slot, :, span] for k in cache.keys]),
                                       torch.stack([v[slot, :, span] for v in cache.values]))
        self._touch(digests)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain of blocks used, its first block last: eviction then takes a chain's tail before its head,
        and a cached block's parents are always cached too."""
        for digest in reversed(chain):
            self.blocks.move_to_end(digest)
