"""What scores PPO's rollouts: a reward model (a `--stage rm` output, full or LoRA) or a rule.

A Reward takes the prompts' and the answers' token ids and returns one score per answer.

- reward_model_type full: `reward_model` is a reward model's directory (its value head in
  value_head.safetensors or as `score`), with `reward_model_adapters` merged into it if given.
- reward_model_type lora (LLaMA-Factory's default): `reward_model` is a LoRA reward adapter (with its
  value_head.safetensors) trained on the same base model as the policy.
- reward_model_type rule (danlu's): `reward_model` names a rule on the answer's text, `contains:WORD`
  (1 if the answer contains WORD, ignoring case, else 0), for experiments whose reward can be computed.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from danlu.checkpoints.value_head import load_value_head, read_value_head
from danlu.data.collate import collate
from danlu.data.supervised import Tokenized
from danlu.models.value_head import last_token_values, token_values
from danlu.training.arguments import ArgumentError
from danlu.utils.progress import logger

Reward = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
RULES = ("contains",)


class ModelReward:
    """A reward model's score at the last token of prompt + answer, as it was trained (danlu's rm stage)."""

    def __init__(self, model: torch.nn.Module, pad_id: int = 0):
        self.model = model.eval().requires_grad_(False)
        self.pad_id = pad_id

    def __call__(self, queries: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return self.score([q + r for q, r in zip(queries, responses)])

    @torch.no_grad()
    def score(self, rows: list[list[int]]) -> torch.Tensor:
        """One score per token sequence (a conversation ending with the answer's end marker)."""
        device = next(self.model.parameters()).device
        batch = collate([Tokenized(row, row) for row in rows], self.pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        return last_token_values(token_values(self.model, input_ids, mask), mask).float()


class ContainsWord:
    def __init__(self, tokenizer, word: str):
        self.tokenizer, self.word = tokenizer, word.lower()

    def __call__(self, queries: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).lower() for r in responses]
        return torch.tensor([float(self.word in text) for text in texts])


def build_reward(lm, args) -> Reward:
    """The run's reward, built before the policy is changed (a LoRA reward model copies the starting base)."""
    if args.reward_model_type == "rule":
        return rule_reward(lm.tokenizer, args.reward_model)
    from danlu.checkpoints.load import load_pretrained
    from danlu.tuning.lora import load_adapter, merge_lora
    from danlu.training.reference import quantized

    device = next(lm.model.parameters()).device
    if args.reward_model_type == "lora":
        model, adapters = copy.deepcopy(lm.model), [args.reward_model]
    else:
        model = load_pretrained(args.reward_model, dtype="float32", device=device).model
        adapters = args.names("reward_model_adapters")
    for adapter in adapters:
        load_adapter(model, adapter)
    merge_lora(model)
    head_from = next((d for d in reversed(adapters) if read_value_head(d) is not None), args.reward_model)
    load_value_head(model, head_from)
    logger.info("reward model: %s%s", args.reward_model, f" + {', '.join(adapters)}" if adapters else "")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    return ModelReward(quantized(model, args.reward_model_quantization_bit), pad)


def rule_reward(tokenizer, rule: str) -> Reward:
    name, _, value = (rule or "").partition(":")
    if name == "contains" and value:
        return ContainsWord(tokenizer, value)
    raise ArgumentError(f"reward_model: {rule!r} is not a rule; with reward_model_type rule expected one of "
                        f"{', '.join(r + ':WORD' for r in RULES)}")
