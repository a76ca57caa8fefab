"""A student cut from its teacher: the same embedding and head, and a chosen subset of its blocks."""
from __future__ import annotations

from typing import Sequence

import torch

from danlu.checkpoints.load import model_from_state_dict
from danlu.models.transformer import Transformer

LAYER_PREFIX = "model.layers."


def renumbered_layers(state: dict[str, torch.Tensor], kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """The state dict with only the blocks in `kept` (0-based, in order), renumbered 0..len(kept)-1."""
    position = {layer: i for i, layer in enumerate(kept)}
    result = {}
    for name, tensor in state.items():
        if not name.startswith(LAYER_PREFIX):
            result[name] = tensor
            continue
        layer, rest = name[len(LAYER_PREFIX):].split(".", 1)
        if int(layer) in position:
            result[f"{LAYER_PREFIX}{position[int(layer)]}.{rest}"] = tensor
    return result


def student_from_teacher(teacher: Transformer, layers: Sequence[int]) -> Transformer:
    """A new model holding copies of the teacher's embedding, final norm, head and the blocks `layers`."""
    if sorted(set(layers)) != list(layers) or not all(0 <= i < teacher.config.num_hidden_layers for i in layers):
        raise ValueError(f"layers must be increasing block indices of the teacher (0..."
                         f"{teacher.config.num_hidden_layers - 1}), got {list(layers)}")
    state = {name: tensor.detach().clone() for name, tensor in teacher.state_dict().items()}
    config = teacher.config.replace(num_hidden_layers=len(layers))
    device = next(teacher.parameters()).device
    return model_from_state_dict(config, renumbered_layers(state, layers), device).train(teacher.training)
