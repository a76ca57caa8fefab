"""Every training loss in one module. Labels hold IGNORE_INDEX (-100) where nothing is predicted.

Each position predicts the next label: the labels are shifted, never the logits (slicing the logits would
copy them, and their gradient, for the whole batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from danlu.data.supervised import IGNORE_INDEX


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with IGNORE_INDEX at the end: the target of each position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-mean cross-entropy of next-token prediction, and how many labels counted."""
    targets = next_token_labels(labels).reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / max(count, 1), count


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                           chunk_size: int) -> tuple[torch.Tensor, int]:
    """causal_lm_loss from the final hidden states, never holding float32 logits for the whole batch.

    Only the positions that have a label go through the head (in SFT the prompt is most of them), `chunk_size`
    at a time; each chunk's logits are dropped after its loss and recomputed in the backward pass
    (LitGPT's lm_head_chunk_size and Liger's fused linear cross-entropy pursue the same saving).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    targets = next_token_labels(labels).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    count = int(keep.numel())
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_summed_cross_entropy, head, hidden[piece], targets[piece], use_reentrant=False)
    return total / max(count, 1), count


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its labelled next tokens, and how many there were.

    What DPO-style preference losses compare between the policy and the reference model.
    """
    targets = next_token_labels(labels)
    mask = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)
