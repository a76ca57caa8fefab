"""Every training loss in one module: language modelling (token-mean CE, chunked CE) and preference learning
(DPO and its variants, ORPO, SimPO, KTO, the pairwise reward-model loss). Labels hold IGNORE_INDEX (-100)
where nothing is predicted.

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


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions have a next token to predict: what a causal-LM batch's mean loss is over."""
    return int((next_token_labels(labels) != IGNORE_INDEX).sum())


def summed_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy summed over the labelled positions (in float32)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), next_token_labels(labels).reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-mean cross-entropy of next-token prediction, and how many labels counted."""
    count = labelled_tokens(labels)
    return summed_causal_lm_loss(logits, labels) / max(count, 1), count


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


def average_log_probs(summed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-token mean of sequence_log_probs: what IPO, ORPO and SimPO compare (length-normalised)."""
    return summed / counts.clamp(min=1)


# ---------------------------------------------------------------- preference losses
# Each takes per-sequence log-probabilities (summed, or averaged where the method says) of the chosen and
# rejected answers and returns per-pair losses; the formulas are TRL's (dpo_trainer.py, cpo_trainer.py,
# kto_trainer.py) and LLaMA-Factory's (train/dpo/trainer.py), with their names.

DPO_LOSSES = ("sigmoid", "hinge", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its reference-based variants: (losses, chosen_rewards, rejected_rewards), each [pairs].

    sigmoid: -log σ(β·h) (with cDPO's label smoothing ε: -(1-ε) log σ(β·h) - ε log σ(-β·h));
    hinge: relu(1 - β·h); ipo: (h - 1/(2β))² on length-averaged log-probs; where
    h = (π_c - π_r) - (ref_c - ref_r). The rewards are β(π - ref), detached.
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif kind == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO, reference-free, on length-averaged log-probs: (losses, sft_loss, odds_ratio_loss).

    The log odds ratio is log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)); loss = -log p_c - β log σ(that).
    """
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg))
                                              - torch.log1p(-torch.exp(rejected_avg)))
    sft = -chosen_avg
    odds_ratio = -F.logsigmoid(log_odds)
    return sft + beta * odds_ratio, sft, odds_ratio


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO, reference-free, on length-averaged log-probs: -log σ(β(π_c - π_r) - γ)."""
    return -F.logsigmoid(beta * ((chosen_avg - rejected_avg) - gamma / beta))


def kto_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, policy_kl: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, ref_kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO on unpaired answers: (losses [desirable then undesirable], chosen_rewards, rejected_rewards, kl).

    The reference point z0 is the batch's KL estimate, mean(π_kl - ref_kl) over mismatched prompt/answer
    pairs, clamped at 0 and detached: desirable answers lose 1 - σ(β(log-ratio - z0)), undesirable ones
    1 - σ(β(z0 - log-ratio)).
    """
    kl = (policy_kl - ref_kl).mean().clamp(min=0).detach()
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), kl


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The reward model's loss: mean of -log σ(r_chosen - r_rejected) (InstructGPT; LLaMA-Factory's rm)."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()
