"""Reward modelling (`--stage rm`): a scalar value head on the last real token of each answer, trained so that
the chosen answer scores above the rejected one: -log σ(r_chosen - r_rejected) (LLaMA-Factory's rm stage)."""
from __future__ import annotations

from functools import partial

from danlu.data.collate import collate_pairs
from danlu.data.preference import prepare_preference_data
from danlu.models.value_head import attach_value_head, last_token_values, token_values
from danlu.training.losses import pairwise_reward_loss
from danlu.training.recipes.pt import pad_id
from danlu.training.recipes.sft import chat_data
from danlu.training.stage import Stage, StepOutput


def build_stage(lm, args) -> Stage:
    data = chat_data(lm, args, prepare_preference_data)
    attach_value_head(lm.model, bias=False)
    return Stage(data.train, data.eval, partial(collate_pairs, pad_id=pad_id(lm.tokenizer)), reward_step,
                 trained_modules=("v_head",))


def sequence_scores(model, batch: dict):
    """The reward of each row of a batch: the value head at its last real token."""
    return last_token_values(token_values(model, batch["input_ids"], batch["attention_mask"]),
                             batch["attention_mask"])


def reward_step(model, batch: dict) -> StepOutput:
    """Pairwise loss on a batch of pairs (chosen rows first); accuracy as LLaMA-Factory's ComputeAccuracy."""
    chosen, rejected = sequence_scores(model, batch).chunk(2)
    metrics = {"accuracy": (chosen > rejected).float().mean().item(),
               "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
               "rewards/margins": (chosen - rejected).mean().item()}
    return StepOutput(pairwise_reward_loss(chosen, rejected), int(batch["attention_mask"].sum()), metrics,
                      weight=len(chosen))
