"""The distillation losses, each the formula of its paper (and TextBrewer's / TRL's function of the same name).

Every loss takes the student's tensor first and the teacher's second, and an optional `mask` of the positions
that count ([batch, seq], 1 = counts); a masked loss is the mean over the positions that count. Shapes:
logits [batch, seq, vocab] or [batch, classes], states [batch, seq, hidden], attention scores
[batch, heads, queries, keys].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("ce", "forward_kl", "reverse_kl", "jsd")


def _positions(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows of x [..., features] at the positions that count, as [n, features]."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask.bool()]


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Hinton's soft target loss -sum_c p_T(c) log p_S(c), both at temperature T, averaged over positions
    (TextBrewer's kd_ce_loss). The T^2 factor that keeps its gradient's scale is the caller's (objective.py)."""
    student = _positions(student_logits, mask).float() / temperature
    teacher = _positions(teacher_logits, mask).float() / temperature
    return -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0,
                    mask=None) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1; TRL's
    generalized_jsd_loss), per position, averaged: beta * KL(T || M) + (1 - beta) * KL(S || M) with the
    mixture M = beta * T + (1 - beta) * S. beta = 0 is the forward KL(T || S), beta = 1 the reverse KL(S || T)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be within [0, 1], got {beta}")
    student = (_positions(student_logits, mask).float() / temperature).log_softmax(-1)
    teacher = (_positions(teacher_logits, mask).float() / temperature).log_softmax(-1)
    if beta == 0.0:
        per_class = kl_terms(teacher, student)
    elif beta == 1.0:
        per_class = kl_terms(student, teacher)
    else:
        weights = torch.tensor([1.0 - beta, beta], device=student.device).log()
        mixture = torch.logsumexp(torch.stack([student + weights[0], teacher + weights[1]]), dim=0)
        per_class = beta * kl_terms(teacher, mixture) + (1.0 - beta) * kl_terms(student, mixture)
    return per_class.sum(-1).mean()


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) per class: summed over classes it is KL(p || q)."""
    return log_p.exp() * (log_p - log_q)


def divergence(kind: str, student_logits, teacher_logits, temperature: float = 1.0, mask=None,
               jsd_beta: float = 0.5) -> torch.Tensor:
    """The soft-label loss by name: ce (Hinton, TextBrewer), forward_kl (the same gradient as ce, minus the
    teacher's entropy, so 0 for a perfect student), reverse_kl (mode seeking, MiniLLM) or jsd (GKD)."""
    if kind == "ce":
        return soft_cross_entropy(student_logits, teacher_logits, temperature, mask)
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": jsd_beta}.get(kind)
    if beta is None:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {list(DIVERGENCES)}")
    return generalized_jsd(student_logits, teacher_logits, beta, temperature, mask)


def hidden_mse(student_states, teacher_states, mask=None) -> torch.Tensor:
    """Mean squared error over the positions that count and every feature (TinyBERT's L_hidn and L_embd once
    the student is projected to the teacher's width; TextBrewer's hid_mse_loss)."""
    return F.mse_loss(_positions(student_states, mask).float(), _positions(teacher_states, mask).float())


def cosine_loss(student_states, teacher_states, mask=None) -> torch.Tensor:
    """1 - cos(student, teacher) per position, averaged: DistilBERT's L_cos (TextBrewer's cos_loss)."""
    student = _positions(student_states, mask).float()
    teacher = _positions(teacher_states, mask).float()
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def normalized_mse(student_vectors, teacher_vectors) -> torch.Tensor:
    """Patient-KD's L_PT for one pair of layers: || h_S / |h_S| - h_T / |h_T| ||^2 averaged over the vectors
    [n, hidden] (the [CLS] vector of each example for an encoder, each counted token for a decoder)."""
    student = F.normalize(student_vectors.float(), dim=-1)
    teacher = F.normalize(teacher_vectors.float(), dim=-1)
    return (student - teacher).pow(2).sum(-1).mean()


def attention_mse(student_scores, teacher_scores, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TinyBERT's L_attn = 1/h sum_i MSE(A_S_i, A_T_i) on the scores before softmax, over the (query, key) pairs
    `allowed` marks ([batch or 1, 1, queries, keys], True = a real pair; None = all). TextBrewer's att_mse_loss
    with an input mask is the case allowed = mask_q x mask_k."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student_scores.shape)}, teacher "
                         f"{tuple(teacher_scores.shape)} (the student needs the teacher's number of heads)")
    squared = (student_scores.float() - teacher_scores.float()).pow(2)
    if allowed is None:
        return squared.mean()
    allowed = allowed.expand_as(squared)
    return squared[allowed].mean()
