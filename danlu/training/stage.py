"""What a stage (pt, sft, rm, dpo, kto, ppo, kd) hands the training loop: its data and its step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch


class StepOutput(NamedTuple):
    loss: torch.Tensor  # a scalar: what backward() sees
    n_tokens: int  # input tokens processed (throughput, num_input_tokens_seen)
    metrics: dict = {}  # more numbers to log, averaged over the logging window
    weight: float = 1.0  # what this batch weighs in an evaluation mean (e.g. its labelled tokens)


Step = Callable[[torch.nn.Module, dict], StepOutput]
# A group of micro-batches of examples -> the groups to take optimizer steps on (see Stage.updates).
Updates = Callable[[torch.nn.Module, list[list]], Iterable[list[list]]]


@dataclass
class Stage:
    train: Sequence  # examples; `collate` turns a list of them into a batch (a dict of tensors)
    eval: Sequence
    collate: Callable[[list], dict]
    step: Step
    # Modules that train whatever the finetuning method (a value head); saved with the trainable weights.
    trained_modules: tuple[str, ...] = ()
    # Modules that only serve the training (distillation's projections): removed before the final save.
    dropped_modules: tuple[str, ...] = ()
    # None: each accumulation group of examples is one optimizer step. PPO instead rolls a group of prompts
    # out into experience and takes several optimizer steps on it (updates_per_group of them).
    updates: Optional[Updates] = None
    updates_per_group: int = 1
