"""Batches for causal-LM training: right padding, labels -100 on padding, shifted inside the loss."""
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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of each position predicting the next label; and how many labels counted.

    The labels are shifted, not the logits: slicing the logits would copy them (and their gradient).
    """
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    count = int((shift_labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift_labels,
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(count, 1), count
