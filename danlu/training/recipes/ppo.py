"""RLHF with proximal policy optimisation (`--stage ppo`), as LLaMA-Factory's ppo stage (TRL's classic
PPOTrainer): the policy answers prompts, a reward model scores the answers, and the policy and its critic (a
value head on the same backbone) learn from the scores, held near a frozen reference by a KL penalty.

One fit "group" of prompts (per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size) is a
PPO step: it is rolled out with danlu's KV-cache generation (which returns each sampled token's log-prob),
scored, shaped into per-token rewards and advantages (danlu/training/ppo.py), then trained on for ppo_epochs
epochs of ppo_buffer_size optimizer steps. With LoRA the reference is the policy with its adapters off, so
the run holds one base model (plus the reward model's).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from danlu.data.collate import collate
from danlu.data.dataset import prepare_sft_data
from danlu.data.preference import prompt_of
from danlu.data.supervised import Tokenized
from danlu.generation.generate import generate, sampled_token_logprobs
from danlu.generation.sampling import GenerationConfig
from danlu.models.value_head import attach_value_head
from danlu.training.ppo import (PPOHyperparameters, RunningMoments, advantages_and_returns, kl_controller,
                                mean_sequence_kl, normalize_scores, ppo_loss, token_rewards)
from danlu.training.recipes.sft import chat_data
from danlu.training.reference import Reference, build_reference
from danlu.training.rewards import Reward, build_reward
from danlu.training.stage import Stage, StepOutput


@dataclass
class Experience:
    """One rolled-out prompt, with what the PPO update needs of it (per response token)."""
    query: list[int]
    response: list[int]
    logprobs: torch.Tensor  # of the policy that sampled it
    values: torch.Tensor  # of the critic then
    advantages: torch.Tensor
    returns: torch.Tensor
    score: float
    kl: float  # summed over the response, policy vs reference


@dataclass
class PPOSettings:
    generation: GenerationConfig
    batch_size: int  # experiences per micro-batch
    accumulation: int  # micro-batches per optimizer step
    ppo_epochs: int = 4
    score_norm: bool = False
    hparams: PPOHyperparameters = PPOHyperparameters()
    seed: int = 42


def build_stage(lm, args) -> Stage:
    data = chat_data(lm, args, prepare_sft_data)
    prompts = [prompt_of(example) for example in data.train]
    reward = build_reward(lm, args)  # before the policy changes: a LoRA reward model starts from the same base
    reference = build_reference(lm, args)
    settings = PPOSettings(args.generation_config(), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                           args.ppo_epochs, args.ppo_score_norm,
                           PPOHyperparameters(target=args.ppo_target, whiten_rewards=args.ppo_whiten_rewards),
                           args.seed)
    return ppo_stage(lm.model, lm.tokenizer, prompts, reward, reference, settings, args.ppo_buffer_size)


def ppo_stage(model, tokenizer, prompts: list[Tokenized], reward: Reward, reference: Reference,
              settings: PPOSettings, buffer_size: int = 1) -> Stage:
    attach_value_head(model)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    rollout = Rollout(model, tokenizer, reward, reference, settings)
    step = partial(ppo_step, temperature=settings.generation.temperature, hparams=settings.hparams)
    return Stage(prompts, [], partial(collate_experience, pad_id=pad_id), step, trained_modules=("v_head",),
                 updates=rollout.updates, updates_per_group=settings.ppo_epochs * buffer_size)


class Rollout:
    """Turns a group of prompts into experience and the experience into optimizer steps (Stage.updates)."""

    def __init__(self, model, tokenizer, reward: Reward, reference: Reference, settings: PPOSettings):
        self.model, self.tokenizer, self.reward, self.reference = model, tokenizer, reward, reference
        self.settings = settings
        self.kl_control = kl_controller(settings.hparams)
        self.score_moments = RunningMoments()
        self.shuffle = random.Random(settings.seed)

    def updates(self, model, group: list[list[Tokenized]]) -> Iterator[list[list[Experience]]]:
        experience = self.experience([prompt.input_ids for batch in group for prompt in batch])
        size, accumulation = self.settings.batch_size, self.settings.accumulation
        for _ in range(self.settings.ppo_epochs):
            order = list(range(len(experience)))
            self.shuffle.shuffle(order)
            batches = [[experience[i] for i in order[start:start + size]] for start in range(0, len(order), size)]
            for start in range(0, len(batches), accumulation):
                yield batches[start:start + accumulation]

    @torch.no_grad()
    def experience(self, queries: list[list[int]]) -> list[Experience]:
        model, settings = self.model, self.settings
        was_training = model.training
        model.eval()
        completions = generate(model, self.tokenizer, queries, settings.generation, batch_size=settings.batch_size,
                               logprobs=True, keep_eos=True)
        responses = [c.token_ids or [self.eos_id()] for c in completions]
        logprobs = pad_rows([c.logprobs or [0.0] for c in completions])
        scores = self.reward(queries, responses).float()
        if settings.score_norm:
            scores = normalize_scores(scores, self.score_moments)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in sequence_batch(queries, responses, pad_id=0).items()}
        logprobs, scores = logprobs.to(device), scores.to(device)
        values = response_rows(model.v_head(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  return_hidden=True)), batch)
        ref_logprobs = self.reference.run(model, lambda m: response_rows(
            token_logprobs(m(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["input_ids"],
                           settings.generation.temperature), batch))
        mask = batch["response_mask"]
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, self.kl_control.value)
        advantages, returns = advantages_and_returns(values, rewards, mask, settings.hparams.gamma,
                                                     settings.hparams.lam, settings.hparams.whiten_rewards)
        sequence_kl = (kl * mask).sum(-1)
        self.kl_control.update(mean_sequence_kl(kl, mask).item(), len(queries))
        model.train(was_training)
        return [Experience(q, r, logprobs[i, :len(r)].cpu(), values[i, :len(r)].cpu(), advantages[i, :len(r)].cpu(),
                           returns[i, :len(r)].cpu(), scores[i].item(), sequence_kl[i].item())
                for i, (q, r) in enumerate(zip(queries, responses))]

    def eos_id(self) -> int:
        return self.model.config.eos_token_ids[0]


def pad_rows(rows: list[list[float]]) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0.0] * (longest - len(r)) for r in rows], dtype=torch.float32)


def sequence_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """query + response per row, right-padded, with where each row's response starts and how long it is."""
    batch = collate([Tokenized(q + r, q + r) for q, r in zip(queries, responses)], pad_id)
    starts = torch.tensor([len(q) for q in queries])
    lengths = torch.tensor([len(r) for r in responses])
    response_mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float()
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "starts": starts,
            "lengths": lengths, "response_mask": response_mask}


def response_rows(per_position: torch.Tensor, batch: dict) -> torch.Tensor:
    """[batch, seq] values at the positions that predict each response token -> [batch, longest response]."""
    lengths, starts = batch["lengths"], batch["starts"]
    offsets = torch.arange(int(lengths.max()), device=starts.device)
    index = (starts[:, None] - 1 + offsets[None, :]).clamp(max=per_position.shape[1] - 1)
    return per_position.gather(1, index) * batch["response_mask"]


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(next token) at every position, at the sampling temperature (as the rollout's log-probs)."""
    return sampled_token_logprobs(logits, torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1), temperature)


def collate_experience(items: list[Experience], pad_id: int) -> dict:
    batch = sequence_batch([e.query for e in items], [e.response for e in items], pad_id)
    for name in ("logprobs", "values", "advantages", "returns"):
        batch["old_" + name if name in ("logprobs", "values") else name] = pad_rows(
            [getattr(e, name).tolist() for e in items])
    batch["scores"] = torch.tensor([e.score for e in items])
    batch["kl"] = torch.tensor([e.kl for e in items])
    return batch


def ppo_step(model, batch: dict, temperature: float, hparams: PPOHyperparameters) -> StepOutput:
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
    logprobs = response_rows(token_logprobs(model.lm_head(hidden), batch["input_ids"], temperature), batch)
    values = response_rows(model.v_head(hidden), batch)
    loss, stats = ppo_loss(logprobs, batch["old_logprobs"], values, batch["old_values"], batch["advantages"],
                           batch["returns"], batch["response_mask"], hparams.cliprange, hparams.cliprange_value,
                           hparams.vf_coef, hparams.ratio_threshold)
    metrics = {name: value.item() for name, value in stats.items()}
    metrics.update({"reward": batch["scores"].mean().item(), "objective/kl": batch["kl"].mean().item(),
                    "response_length": batch["lengths"].float().mean().item()})
    return StepOutput(loss, int(batch["attention_mask"].sum()), metrics, weight=len(batch["scores"]))
