"""The model side of serving: batched prefill of new prompts into their slots, and one decode step for all running
requests. It knows tensors and slots, not requests' lives (that is the scheduler's).

Prefill puts several prompts through one forward, right-padded to the longest: attention being causal, a real
token never sees the padding after it, and each slot's length advances by its own prompt's length only, so the
padding's keys lie past the end and are overwritten later. A prompt longer than `chunk` tokens is prefilled in
chunks of that size (one forward per chunk round), which bounds a forward's activation memory. With a prefix cache,
each prompt starts where its cached beginning ends (rows of different pasts go through one forward as decoding's
do), and its full blocks are kept for the prompts that follow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from danlu.serving.prefix_cache import PrefixCache
from danlu.serving.slots import SlotKVCache


class ModelRunner:
    def __init__(self, model, max_batch: int, adapters=None, chunk: int = 512,
                 prefix_cache: Optional[PrefixCache] = None):
        self.model = model.eval()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.context = model.config.max_position_embeddings
        self.cache = SlotKVCache(model.config, max_batch, self.context, self.dtype, self.device)
        self.adapters = adapters  # a MultiLoRA (per-row adapters) or None
        self.chunk = chunk
        self.prefix_cache = prefix_cache

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """Write each prompt's keys and values into its (reset) slot; return the logits [n, vocab] that follow
        each prompt's last token."""
        adapters = adapters or [None] * len(prompts)
        done = [self._restore(slot, prompt, adapter) for slot, prompt, adapter in zip(slots, prompts, adapters)]
        last = [None] * len(prompts)
        while rows := [i for i, p in enumerate(prompts) if done[i] < len(p)]:
            pieces = [list(prompts[i][done[i]:done[i] + self.chunk]) for i in rows]
            width = max(len(piece) for piece in pieces)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for j, piece in enumerate(pieces):
                ids[j, :len(piece)] = torch.tensor(piece)
            view = self.cache.view([slots[i] for i in rows], new_tokens=[len(piece) for piece in pieces])
            self._set_adapters([adapters[i] for i in rows])
            hidden = self.model(ids.to(self.device), attention_mask=view.attention_mask(width),
                                position_ids=view.position_ids(width), kv_cache=view, return_hidden=True)
            ends = torch.tensor([len(piece) - 1 for piece in pieces], device=self.device)
            logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), ends])
            for j, i in enumerate(rows):
                last[i] = logits[j]
                done[i] += len(pieces[j])
        if self.prefix_cache is not None:
            for slot, prompt, adapter in zip(slots, prompts, adapters):
                self.prefix_cache.store(self.cache, slot, prompt, adapter)
        return torch.stack(last)

    def remember(self, slot: int, tokens: Sequence[int], adapter: Optional[str]) -> None:
        """Keep the blocks of a finished request's `tokens` (its prompt and answer; the slot holds the keys and values
        of all but the last) for a later prompt that repeats them: the next turn of a conversation."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(self.cache, slot, tokens, adapter)

    def _restore(self, slot: int, prompt: Sequence[int], adapter: Optional[str]) -> int:
        """Reset `slot`; return how many of the prompt's tokens it holds already (a cached beginning)."""
        self.cache.reset(slot)
        return self.prefix_cache.restore(self.cache, slot, prompt, adapter) if self.prefix_cache is not None else 0

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int],
               adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """One token for each slot: the logits [n, vocab] that follow it."""
        view = self.cache.view(list(slots))
        self._set_adapters(adapters)
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        return self.model(ids, attention_mask=view.attention_mask(1), position_ids=view.position_ids(1),
                          kv_cache=view)[:, -1]

    def _set_adapters(self, names: Optional[Sequence[Optional[str]]]) -> None:
        if self.adapters is not None:
            self.adapters.set_rows(list(names) if names is not None else [])
