"""Activation checkpointing applied from outside the model: each block recomputes its activations."""
from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint


def enable_gradient_checkpointing(model) -> None:
    for block in model.model.layers:
        forward = block.forward
        # kv_cache is None in training; the block's output depends only on its tensor inputs.
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)
