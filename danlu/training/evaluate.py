"""Validation: a stage's step over the evaluation examples, without gradients, as weighted means."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from danlu.training.stage import StepOutput


@torch.no_grad()
def evaluate(model: torch.nn.Module, forward: Callable[[dict], StepOutput], data: Sequence, collate: Callable,
             batch_size: int) -> dict[str, float]:
    """{"eval_loss": ..., "eval_<metric>": ...}, each batch weighted by its StepOutput.weight (a metric over
    the batches that report it)."""
    was_training = model.training
    model.eval()
    sums, weights = {}, {}
    for start in range(0, len(data), batch_size):
        out = forward(collate([data[i] for i in range(start, min(start + batch_size, len(data)))]))
        for key, value in {"loss": out.loss.item(), **out.metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * out.weight
            weights[key] = weights.get(key, 0.0) + out.weight
    model.train(was_training)
    return {f"eval_{key}": value / max(weights[key], 1e-12) for key, value in sums.items()}
