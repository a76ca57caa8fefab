"""The model side of serving: batched prefill of new prompts into their slots, and one decode step for all running
requests. It knows tensors and slots, not requests' lives (that is the scheduler's).

Prefill puts several prompts through one forward, right-padded to the longest: attention being causal, a real
token never sees the padding after it, and each slot's length advances by its own prompt's length only, so the
padding's keys lie past the end and are overwritten later. A prompt longer than `chunk` tokens is prefilled in
chunks of that size (one forward per chunk round), which bounds a forward's activation memory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from danlu.serving.slots import SlotKVCache


class ModelRunner:
    def __init__(self, model, max_batch: int, adapters=None, chunk: int = 512):
        self.model = model.eval()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.context = model.config.max_position_embeddings
        self.cache = SlotKVCache(model.config, max_batch, self.context, self.dtype, self.device)
        self.adapters = adapters  # a MultiLoRA (per-row adapters) or None
        self.chunk = chunk

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """Write each prompt's keys and values into its (reset) slot; return the logits [n, vocab] that follow
        each prompt's last token."""
        for slot in slots:
            self.cache.reset(slot)
        last = [None] * len(prompts)
        done = 0
        longest = max(len(p) for p in prompts)
        while done < longest:
            rows = [i for i, p in enumerate(prompts) if len(p) > done]
            pieces = [list(prompts[i][done:done + self.chunk]) for i in rows]
            width = max(len(piece) for piece in pieces)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for j, piece in enumerate(pieces):
                ids[j, :len(piece)] = torch.tensor(piece)
            view = self.cache.view([slots[i] for i in rows], new_tokens=[len(piece) for piece in pieces])
            self._set_adapters([adapters[i] for i in rows] if adapters else None)
            hidden = self.model(ids.to(self.device), attention_mask=view.attention_mask(width),
                                position_ids=view.position_ids(width), kv_cache=view, return_hidden=True)
            ends = torch.tensor([len(piece) - 1 for piece in pieces], device=self.device)
            logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), ends])
            for j, i in enumerate(rows):
                last[i] = logits[j]
            done += self.chunk
        return torch.stack(last)

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
