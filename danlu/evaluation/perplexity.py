"""Perplexity over non-overlapping windows: every token after a window's first is predicted once."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from danlu.utils.progress import progress


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per predicted token, in nats
    perplexity: float
    tokens: int  # predicted tokens
    windows: int


def perplexity(model, token_ids: list[int], ctx: int, show_progress: bool = False) -> PerplexityResult:
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    if ctx > model.config.max_position_embeddings:
        raise ValueError(f"ctx {ctx} exceeds the model's context of {model.config.max_position_embeddings}")
    windows = [token_ids[i:i + ctx] for i in range(0, len(token_ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"the text has {len(token_ids)} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    bar = progress(total=len(windows), desc="Perplexity", disable=not show_progress, unit="window")
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window], device=device)
            logits = model(ids).float()
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += len(window) - 1
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(mean, math.exp(mean), total_tokens, len(windows))
