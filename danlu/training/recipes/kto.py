"""Kahneman-Tversky optimisation (`--stage kto`): unpaired answers, each judged desirable or not (`kto_tag`),
as LLaMA-Factory's kto stage (TRL's KTO loss).

The reference point is the batch's KL estimate: the policy's and the reference's log-probabilities of each
prompt with another item's answer (the kl_* rows), computed without gradients.
"""
from __future__ import annotations

from functools import partial

import torch

from danlu.data.collate import collate_feedback
from danlu.data.preference import prepare_feedback_data
from danlu.training.losses import average_log_probs, kto_loss, sequence_log_probs
from danlu.training.recipes.pt import pad_id
from danlu.training.recipes.sft import chat_data
from danlu.training.reference import Reference, build_reference
from danlu.training.stage import Stage, StepOutput


def build_stage(lm, args) -> Stage:
    data = chat_data(lm, args, prepare_feedback_data)
    step = partial(kto_step, reference=build_reference(lm, args), beta=args.pref_beta, ftx=args.pref_ftx,
                   desirable_weight=args.kto_chosen_weight, undesirable_weight=args.kto_rejected_weight)
    return Stage(data.train, data.eval, partial(collate_feedback, pad_id=pad_id(lm.tokenizer)), step)


def log_probs(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and per-token mean log-probabilities of each row's answer (the kl_* rows with prefix "kl_")."""
    logits = model(batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"])
    summed, counts = sequence_log_probs(logits, batch[prefix + "labels"])
    return summed, average_log_probs(summed, counts)


def kto_step(model, batch: dict, reference: Reference, beta: float, ftx: float = 0.0,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> StepOutput:
    desirable = batch["desirable"]
    policy, policy_mean = log_probs(model, batch)
    with torch.no_grad():
        policy_kl, _ = log_probs(model, batch, "kl_")
    ref, ref_kl = reference.run(model, lambda m: (log_probs(m, batch)[0], log_probs(m, batch, "kl_")[0]))
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        policy[desirable], policy[~desirable], policy_kl, ref[desirable], ref[~desirable], ref_kl, beta,
        desirable_weight, undesirable_weight)
    loss = losses.mean()
    if ftx and desirable.any():  # the SFT term on the desirable answers, scaled exactly as LLaMA-Factory does
        loss = loss + ftx * -policy_mean[desirable].mean() / desirable.sum() * len(desirable)
    metrics = {"kl": kl.item()}
    if desirable.any():
        metrics.update({"rewards/chosen": chosen_rewards.mean().item(), "logps/chosen": policy[desirable].mean().item()})
    if (~desirable).any():
        metrics.update({"rewards/rejected": rejected_rewards.mean().item(),
                        "logps/rejected": policy[~desirable].mean().item()})
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = chosen_rewards.mean().item() - rejected_rewards.mean().item()
    return StepOutput(loss, int(batch["attention_mask"].sum()), metrics, weight=len(desirable))
