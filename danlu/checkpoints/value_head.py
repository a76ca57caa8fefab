"""A reward model's value head on disk, in the layouts its users read.

- LLaMA-Factory / trl: `value_head.safetensors` holding `v_head.summary.weight` [1, hidden] and
  `v_head.summary.bias` [1], beside a LoRA adapter or a full model (LF also reads `value_head.bin`).
- transformers: `score.weight` [1, hidden] in the model's weights with one label in config.json, which
  `AutoModelForSequenceClassification` loads (it scores the last non-padding token, as danlu does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.hf import iter_tensors, weight_files
from danlu.models.value_head import attach_value_head

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_BIN = "value_head.bin"
WEIGHT, BIAS = "v_head.summary.weight", "v_head.summary.bias"


def value_head_state(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """trl's two tensors; a bias-free head (a reward model's) writes a zero bias, which trl's loader needs."""
    weight = head.summary.weight.detach().float().contiguous()
    bias = head.summary.bias
    return {WEIGHT: weight, BIAS: bias.detach().float().contiguous() if bias is not None else weight.new_zeros(1)}


def save_value_head(head: torch.nn.Module, directory: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / VALUE_HEAD_FILE
    save_file(value_head_state(head), str(path), metadata={"format": "pt"})
    return path


def sequence_classification_head(head: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The head as transformers' `score` and the config.json keys that make a one-label classifier."""
    if head.summary.bias is not None and head.summary.bias.detach().abs().max() > 0:
        raise CheckpointError("this value head has a bias, which AutoModelForSequenceClassification's `score` "
                              "cannot hold; it is kept in value_head.safetensors only")
    config = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    return {"score.weight": head.summary.weight.detach().float().contiguous()}, config


def read_value_head(directory: Path) -> Optional[dict[str, torch.Tensor]]:
    """{v_head.summary.weight, v_head.summary.bias} from a directory in any layout above, or None if it has no
    value head. A bias-free `score` reads with a zero bias."""
    directory = Path(directory)
    if (directory / VALUE_HEAD_FILE).is_file():
        state = {name: tensor for _, name, tensor in iter_tensors([directory / VALUE_HEAD_FILE])}
    elif (directory / VALUE_HEAD_BIN).is_file():
        state = {name: tensor for _, name, tensor in iter_tensors([directory / VALUE_HEAD_BIN])}
    else:
        try:
            files = weight_files(directory)
        except CheckpointError:
            return None
        score = next((t for _, name, t in iter_tensors(files) if name == "score.weight"), None)
        if score is None:
            return None
        if score.shape[0] != 1:
            raise CheckpointError(f"{directory}: score.weight has {score.shape[0]} labels; a reward model has one")
        return {WEIGHT: score.float(), BIAS: torch.zeros(1)}
    state = {name.removeprefix("pretrained_model."): tensor for name, tensor in state.items()}
    if WEIGHT not in state:
        raise CheckpointError(f"{directory}: the value head file holds {sorted(state)}, expected {WEIGHT!r} "
                              f"(and {BIAS!r})")
    return {WEIGHT: state[WEIGHT].float(), BIAS: state.get(BIAS, torch.zeros(1)).float()}


def load_value_head(model: torch.nn.Module, directory: Path) -> None:
    """Put the value head saved in `directory` on `model` (attaching one, with a bias: LLaMA-Factory's heads
    have one), checking its shape."""
    state = read_value_head(directory)
    if state is None:
        raise CheckpointError(f"{directory}: no value head found (looked for {VALUE_HEAD_FILE}, {VALUE_HEAD_BIN} "
                              f"and score.weight in the model's weights); is this a reward model (--stage rm)?")
    head = attach_value_head(model)
    if tuple(state[WEIGHT].shape) != tuple(head.summary.weight.shape):
        raise CheckpointError(f"{directory}: {WEIGHT} has shape {tuple(state[WEIGHT].shape)}, this model needs "
                              f"{tuple(head.summary.weight.shape)}")
    with torch.no_grad():
        head.summary.weight.copy_(state[WEIGHT])
        head.summary.bias.copy_(state[BIAS].reshape(1))
