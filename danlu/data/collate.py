"""Batches for causal-LM training: right padding, labels -100 on padding (danlu.training.losses shifts them)."""
from __future__ import annotations

import torch

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

