"""Batches for causal-LM training: right padding, labels -100 on padding (danlu.training.losses shifts them).

Preference batches (rm, dpo, kto) are the same rows: collate_pairs and collate_feedback lay them out."""
from __future__ import annotations

import torch

from danlu.data.preference import TokenizedFeedback, TokenizedPair
from danlu.data.supervised import IGNORE_INDEX, Tokenized


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    packed = any(e.document_ids is not None for e in examples)
    document_ids = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        document_ids[i, :n] = torch.tensor(e.document_ids) if e.document_ids is not None else 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["document_ids"] = document_ids
    return batch



def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen rows, then the rejected rows in the same order: one forward pass scores both, and row i is
    paired with row i + len(pairs) (LLaMA-Factory's pairwise collator)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def collate_feedback(items: list[TokenizedFeedback], pad_id: int) -> dict[str, torch.Tensor]:
    """The judged completions, their KL counterparts as kl_* (padded on their own) and `desirable` [B]."""
    batch = collate([item.completion for item in items], pad_id)
    kl = collate([item.kl for item in items], pad_id)
    batch.update({f"kl_{key}": kl[key] for key in ("input_ids", "labels", "attention_mask")})
    batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
    return batch
