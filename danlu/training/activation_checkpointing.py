"""Activation checkpointing applied from outside the model (torchtitan's apply_ac): each transformer block keeps
fewer of its activations for the backward pass and recomputes the rest there.

- full: a block keeps only its inputs; the backward pass runs its whole forward again.
- selective: a block keeps the outputs of its matrix multiplications (q/k/v/o, gate/up/down and LoRA's factors:
  aten.mm / aten.addmm, which every nn.Linear dispatches to) and recomputes everything else, above all the
  attention core softmax(QK^T)V: Megatron's --recompute-activations (Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models"), Pai-Megatron-Patch's AC=sel. The attention core is cheap to
  recompute and, on its unfused (math) path, its [batch x heads, seq, seq] scores are the largest activations
  of all. That path runs as aten.bmm (QK^T and the product with V), which is why bmm is recomputed, not kept.

Either way the block's forward is wrapped in torch.utils.checkpoint (non-reentrant). The wrapper replaces the
block's `forward` and leaves its class and parameter names alone, so it survives the parallel layouts of
danlu.distributed applied after it. torchtitan's order is tensor parallel, activation checkpointing, FSDP; the
first two commute here, since TP shards the block's linears in place and only their hooks run inside the
block. FSDP2's fully_shard and DDP's hooks sit on the block's (or the root's) __call__, outside the
checkpointed region, and FSDP2 gathers a block's weights before its backward, so before the recomputation. A
pipeline stage keeps some of the blocks, wrapped as they were.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

aten = torch.ops.aten
# What selective checkpointing keeps: the linear layers' outputs. nn.Linear reaches the dispatcher as
# aten.mm (no bias) or aten.addmm (bias), its input flattened to 2-D (aten.linear and aten.matmul are
# composite and never reach it).
SAVED_OPS = frozenset({aten.mm, aten.addmm})
# The attention core as F.scaled_dot_product_attention dispatches it, named so that the policy says what it
# recomputes on every device: CPU (flash_for_cpu), CUDA (flash, efficient, cudnn, and the kernels beneath them),
# MPS (its math op) and out-of-tree backends (overrideable). The generic math path decomposes before dispatch
# (bmm, softmax), and falls under "everything else".
ATTENTION_OPS = frozenset({
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_fused_attention_overrideable, aten._scaled_dot_product_attention_math_for_mps,
    aten._flash_attention_forward, aten._efficient_attention_forward,
})


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the matrix multiplications' outputs; recompute the rest, the attention core without fail."""
    packet = op.overloadpacket
    if packet in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if packet in ATTENTION_OPS:
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


def apply_activation_checkpointing(model, mode: str) -> None:
    """Checkpoint every transformer block of `model` (a Transformer), as `mode` says: none, full or selective."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return
    extra = {"context_fn": selective_contexts} if mode == "selective" else {}
    for block in model.model.layers:
        forward = block.forward
        # kv_cache is None in training; the block's output depends only on its tensor inputs. Without grad
        # (evaluation, generation), checkpoint just runs the forward.
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False, **extra)
