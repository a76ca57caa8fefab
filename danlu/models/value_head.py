"""A scalar per position from the final hidden states: the reward model's score and PPO's critic.

It rides on the model as `v_head.summary` (a Linear(hidden, 1)), the names trl's
AutoModelForCausalLMWithValueHead and LLaMA-Factory give it, so the backbone keeps its plain names (and LoRA
adapters their PEFT keys) and the head is saved apart as LLaMA-Factory does (value_head.safetensors).
"""
from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """bias=False for a reward model: the pairwise loss cannot learn a bias (it cancels in r_chosen -
    r_rejected; Adam would only amplify rounding noise), and without one the head is exactly transformers'
    `score`. PPO's critic has one."""

    def __init__(self, hidden_size: int, bias: bool = True):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, bias=bias)
        if bias:
            nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> float32 values [batch, seq]."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def attach_value_head(model: nn.Module, bias: bool = True) -> ValueHead:
    """Give `model` a value head (kept if it has one), on its device and dtype."""
    if getattr(model, "v_head", None) is None:
        weight = model.model.norm.weight
        model.v_head = ValueHead(model.config.hidden_size, bias).to(device=weight.device, dtype=weight.dtype)
    return model.v_head


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value head over every position: [batch, seq] float32."""
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)
    return model.v_head(hidden)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's value at its last real token (the score of a whole sequence), with padding on either side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).argmax(-1)
    return values.gather(-1, last[:, None]).squeeze(-1)
