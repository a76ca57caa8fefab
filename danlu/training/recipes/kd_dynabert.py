"""DynaBERT (`--stage kd --kd_method dynabert`): one network trained at several widths, then depths, at once.

Run 1, width-adaptive (`dynabert_depths 1.0`): the model's heads and FFN neurons are first rewired by importance
(danlu.distillation.dynabert), then at every step each width of `dynabert_widths` learns from the teacher (by
default the starting model, frozen): l_pred (soft cross-entropy of the logits) + l_emb + l_hidn layer by layer.
Run 2, depth-adaptive (`dynabert_depths 1.0,0.75,0.5`, model_name_or_path and teacher_model both run 1's
output): each (width, depth) sub-network learns from the teacher at the same width and full depth, its kept
layers matched with their originals. Rewiring is not repeated.

Each sub-network is one micro-batch of the loop's accumulation: an optimizer step averages their gradients,
and only one sub-network's activations are held at a time. Evaluation runs the whole network.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any, Iterator

import torch
from torch import nn

from danlu.distillation.dynabert import importance, kept_layers, rewire, sub_network
from danlu.distillation.objective import Objective, run_model
from danlu.training.losses import causal_lm_loss
from danlu.training.recipes.kd import decoder_step
from danlu.training.stage import Stage, StepOutput
from danlu.utils.progress import logger


@dataclass(frozen=True)
class SizedExample:
    """An example tagged with the sub-network (width, depth) that trains on it."""

    example: Any
    width: float
    depth: float


def build_dynabert_stage(lm, teacher: nn.Module, objective: Objective, args, data: Stage) -> Stage:
    widths, depths = args.multipliers("dynabert_widths"), args.multipliers("dynabert_depths")
    depth_phase = depths != (1.0,)
    if not depth_phase:
        rewire_by_importance(lm.model, data, args)
    # width-major: run 2's teacher runs at the width, so each width's teacher output serves all its depths
    sizes = [(width, depth) for width in widths for depth in depths]
    logger.info("dynabert: %d sub-networks (width, depth) per step: %s", len(sizes), sizes)
    step = partial(dynabert_step, teacher=teacher, objective=objective, teacher_at_width=depth_phase,
                   cached=TeacherCache(), networks={})
    return Stage(data.train, data.eval, partial(collate_sized, data.collate), step,
                 updates=partial(every_size, sizes=sizes))


def rewire_by_importance(model: nn.Module, data: Stage, args) -> None:
    """Heads and neurons ordered by their first-order importance for the language-modelling loss on the first
    `dynabert_importance_batches` training batches (DynaBERT's network rewiring)."""
    size = args.per_device_train_batch_size
    rows = list(islice(data.train, size * args.dynabert_importance_batches))
    batches = [data.collate(rows[i:i + size]) for i in range(0, len(rows), size)]
    scores = importance(model, batches, lambda m, batch: causal_lm_loss(
        m(batch["input_ids"], attention_mask=batch["attention_mask"], document_ids=batch.get("document_ids")),
        batch["labels"])[0])
    rewire(model, scores)
    logger.info("dynabert: rewired the heads and neurons by importance over %d batches", len(batches))


def every_size(model, group: list[list], sizes: list[tuple[float, float]]) -> Iterator[list[list]]:
    """The loop's updates: one optimizer step over every micro-batch of the group at every size."""
    yield [[SizedExample(example, width, depth) for example in batch] for batch in group for width, depth in sizes]


def collate_sized(collate, rows: list) -> dict:
    if rows and isinstance(rows[0], SizedExample):
        return {**collate([row.example for row in rows]), "size": (rows[0].width, rows[0].depth)}
    return collate(rows)  # evaluation: the whole network


class TeacherCache:
    """The teacher's last output: every width of run 1, and every depth at one width of run 2, learns from it."""

    def __init__(self):
        self.key, self.outputs, self.input_ids = None, None, None

    def get(self, key, input_ids: torch.Tensor, compute):
        if key != self.key or self.input_ids is None or not torch.equal(input_ids, self.input_ids):
            self.key, self.input_ids, self.outputs = key, input_ids, compute()
        return self.outputs


def dynabert_step(model, batch: dict, teacher: nn.Module, objective: Objective, teacher_at_width: bool,
                  cached: TeacherCache, networks: dict) -> StepOutput:
    width, depth = batch.get("size", (1.0, 1.0))
    kept = kept_layers(model.config.num_hidden_layers, depth)
    here = dataclasses.replace(objective, layer_map=tuple((i + 1, layer + 1) for i, layer in enumerate(kept)))
    teacher_width = width if teacher_at_width else 1.0
    teacher_view = sized(teacher, teacher_width, 1.0, networks)
    with torch.no_grad():
        teacher_out = cached.get(teacher_width, batch["input_ids"], lambda: run_model(teacher_view, batch, here))
    out = decoder_step(sized(model, width, depth, networks), batch, teacher_out, here)
    out.metrics[f"lm_loss_w{width:g}_d{depth:g}"] = out.metrics["lm_loss"]
    return out


def sized(model: nn.Module, width: float, depth: float, networks: dict):
    """The model at (width, depth): itself at full size, else its sub-network, built once per run (the
    sub-network takes fresh views of the weights at every call)."""
    if (width, depth) == (1.0, 1.0):
        return model
    key = (id(model), width, depth)
    if key not in networks:
        networks[key] = sub_network(model, width, depth)
    return networks[key]
