"""The whole parallel layout applied to a model, in torchtitan's order: tensor parallel first (over mesh["tp"]),
then data parallel over the dp x fsdp sub-mesh (FSDP2 shards the tensor-parallel DTensors further, as 2-D
parallelism). Pipeline parallel is not applied yet.

Tensor parallel starts from the same whole weights on every rank and keeps the layers' default plan: no
sequence parallel, logits gathered whole on every rank (so every loss runs unchanged). The vocabulary is split
over the ranks when tp divides it; otherwise the embedding and the head stay whole on every rank.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from danlu.distributed.data_parallel import apply_data_parallel
from danlu.distributed.layout import ParallelLayout
from danlu.distributed.tensor_parallel import apply_tp, check_tp
from danlu.models.config import ModelConfig


def vocab_parallel(config: ModelConfig, tp: int) -> bool:
    """Whether the embedding and the head split their vocabulary over the `tp` ranks: when tp divides it."""
    return config.vocab_size % tp == 0


def check_layout(config: ModelConfig, layout: ParallelLayout) -> None:
    """Raise ValueError (naming the sizes) unless the model can be laid out as `layout` says."""
    if layout.tp > 1:
        check_tp(config, layout.tp, vocab_parallel(config, layout.tp))


def parallelize(model: nn.Module, mesh: DeviceMesh, layout: ParallelLayout,
                find_unused_parameters: bool = False) -> nn.Module:
    """Apply `layout` to `model` (every rank holding the same whole weights, finetuning method applied)."""
    if layout.tp > 1:
        apply_tp(model, mesh["tp"], sequence_parallel=False, loss_parallel=False,
                 vocab_parallel=vocab_parallel(model.config, layout.tp))
    return apply_data_parallel(model, mesh, layout, find_unused_parameters)
