"""The whole parallel layout applied to a model, in torchtitan's order: the pipeline stage cut first (this rank's
layers of mesh["pp"]), tensor parallel (over mesh["tp"]), then data parallel over the dp x fsdp sub-mesh (FSDP2
shards the tensor-parallel DTensors further, as 2-D parallelism), and the stage put on a pipeline schedule.

Tensor parallel starts from the same whole weights on every rank and keeps the layers' default plan: no
sequence parallel, logits gathered whole on every rank (so every loss runs unchanged). The vocabulary is split
over the ranks when tp divides it; otherwise the embedding and the head stay whole on every rank.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from danlu.distributed.data_parallel import apply_data_parallel
from danlu.distributed.layout import ParallelLayout
from danlu.distributed.pipeline_parallel import Pipeline, PipelineSettings, keep_stage
from danlu.distributed.tensor_parallel import apply_tp, check_tp
from danlu.models.config import ModelConfig


def vocab_parallel(config: ModelConfig, tp: int) -> bool:
    """Whether the embedding and the head split their vocabulary over the `tp` ranks: when tp divides it."""
    return config.vocab_size % tp == 0


def check_layout(config: ModelConfig, layout: ParallelLayout, pipeline: PipelineSettings = PipelineSettings()) -> None:
    """Raise ValueError (naming the sizes) unless the model can be laid out as `layout` says."""
    if layout.tp > 1:
        check_tp(config, layout.tp, vocab_parallel(config, layout.tp))
    if layout.pp > 1 or pipeline.first_stage_layers or pipeline.last_stage_layers:
        pipeline.stages(config.num_hidden_layers, layout.pp)


def parallelize(model: nn.Module, mesh: DeviceMesh, layout: ParallelLayout, find_unused_parameters: bool = False,
                pipeline: PipelineSettings = PipelineSettings()) -> Optional[Pipeline]:
    """Apply `layout` to `model`, in place (every rank holding the same whole weights, finetuning method applied);
    with pp > 1, `model` becomes this rank's stage and the Pipeline that runs it is returned."""
    stage = mesh["pp"].get_local_rank()
    if layout.pp > 1:
        layers = pipeline.stages(model.config.num_hidden_layers, layout.pp)[stage]
        keep_stage(model, layers, first=stage == 0, last=stage == layout.pp - 1)
    if layout.tp > 1:
        apply_tp(model, mesh["tp"], sequence_parallel=False, loss_parallel=False,
                 vocab_parallel=vocab_parallel(model.config, layout.tp))
    apply_data_parallel(model, mesh, layout, find_unused_parameters)
    if layout.pp == 1:
        return None
    return Pipeline(model, mesh, pipeline, next(model.parameters()).device)
