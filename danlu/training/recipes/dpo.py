"""Direct preference optimisation (`--stage dpo`) and its variants (`--pref_loss sigmoid | hinge | ipo | orpo |
simpo`), on pairs rendered with the chat template, as LLaMA-Factory's dpo stage.

The policy's log-probabilities of the chosen and rejected answers (summed; averaged per token for ipo, orpo
and simpo) are compared with the reference model's, computed once per batch without gradients; orpo and
simpo need no reference. `pref_ftx` adds the SFT loss on the chosen answers.
"""
from __future__ import annotations

from functools import partial

import torch

from danlu.data.collate import collate_pairs
from danlu.data.preference import prepare_preference_data
from danlu.training.losses import (average_log_probs, dpo_loss, orpo_loss, sequence_log_probs, simpo_loss)
from danlu.training.recipes.pt import pad_id
from danlu.training.recipes.sft import chat_data
from danlu.training.reference import Reference, build_reference
from danlu.training.stage import Stage, StepOutput

AVERAGED = ("ipo", "orpo", "simpo")  # losses on per-token mean log-probs


def build_stage(lm, args) -> Stage:
    data = chat_data(lm, args, prepare_preference_data)
    reference = build_reference(lm, args) if args.uses_reference else None
    step = partial(preference_step, reference=reference, kind=args.pref_loss, beta=args.pref_beta,
                   ftx=args.pref_ftx, label_smoothing=args.dpo_label_smoothing, simpo_gamma=args.simpo_gamma)
    return Stage(data.train, data.eval, partial(collate_pairs, pad_id=pad_id(lm.tokenizer)), step)


def answer_log_probs(model, batch: dict, averaged: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the log-probability of its answer tokens (summed, or per-token mean), and the per-token mean."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    summed, counts = sequence_log_probs(logits, batch["labels"])
    mean = average_log_probs(summed, counts)
    return (mean if averaged else summed), mean


def preference_step(model, batch: dict, reference: Reference | None, kind: str, beta: float, ftx: float = 0.0,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> StepOutput:
    averaged = kind in AVERAGED
    logps, mean_logps = answer_log_probs(model, batch, averaged)
    chosen, rejected = logps.chunk(2)
    metrics = {}
    if kind == "orpo":
        losses, sft, odds_ratio = orpo_loss(chosen, rejected, beta)
        metrics.update({"sft_loss": sft.mean().item(), "odds_ratio_loss": odds_ratio.mean().item()})
    elif kind == "simpo":
        losses = simpo_loss(chosen, rejected, beta, simpo_gamma)
    if kind in ("orpo", "simpo"):
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    else:
        ref_chosen, ref_rejected = reference.run(model, lambda m: answer_log_probs(m, batch, averaged)[0]).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, kind,
                                                            label_smoothing)
    if ftx:
        losses = losses + ftx * -mean_logps.chunk(2)[0]
    metrics.update(reward_metrics(chosen_rewards, rejected_rewards))
    metrics.update({"logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()})
    return StepOutput(losses.mean(), int(batch["attention_mask"].sum()), metrics, weight=len(chosen))


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """What LLaMA-Factory and TRL log of the implicit rewards, under their names."""
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}
