"""What a stage (sft, pt, and later rm, dpo, ppo, kd) hands the training loop: its data and its step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch


class StepOutput(NamedTuple):
    loss: torch.Tensor  # a scalar: what backward() sees
    n_tokens: int  # input tokens processed (throughput, num_input_tokens_seen)
    metrics: dict = {}  # more numbers to log, averaged over the logging window
    weight: float = 1.0  # what this batch weighs in an evaluation mean (e.g. its labelled tokens)


Step = Callable[[torch.nn.Module, dict], StepOutput]


@dataclass
class Stage:
    train: Sequence  # examples; `collate` turns a list of them into a batch (a dict of tensors)
    eval: Sequence
    collate: Callable[[list], dict]
    step: Step
