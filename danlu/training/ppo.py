"""PPO's arithmetic for RLHF, apart from any model or loop: KL-shaped rewards, GAE, the clipped losses.

The formulas are those of TRL's classic PPOTrainer (trl 0.9.x, what LLaMA-Factory's `--stage ppo` runs):
`compute_rewards`, `compute_advantages` and `loss` in trl/trainer/ppo_trainer.py, `masked_whiten` in
trl/core.py, the KL controllers and `RunningMoments` in trl/trainer/utils.py. Every tensor is a padded
[batch, T] response tensor; `mask` is 1 on real response tokens and 0 on padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from danlu.utils.progress import logger


@dataclass(frozen=True)
class PPOHyperparameters:
    """TRL's PPOConfig defaults, the one place they are written down."""
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0  # the per-sequence KL the adaptive controller steers towards
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ratio_threshold: float = 10.0  # a minibatch whose mean ratio exceeds this is skipped (loss zeroed)
    whiten_rewards: bool = False


DEFAULTS = PPOHyperparameters()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the masked entries, as TRL's masked_var."""
    count = mask.sum()
    if count == 0:
        raise ValueError("the mask selects no token: nothing to take a variance of")
    variance = masked_mean((values - masked_mean(values, mask)) ** 2, mask)
    return variance * count / (count - 1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked entries and, with `shift_mean`, centre them on zero.

    Without `shift_mean` the mean is kept: whitening rewards must not change their sign on average.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


class RunningMoments:
    """Running mean and standard deviation of every reward-model score seen so far (Chan et al.'s
    parallel update), so that scores can be normalised across steps: LLaMA-Factory's `ppo_score_norm`.

    One process only; with several ranks the batch moments would have to be all-reduced first.
    """

    def __init__(self) -> None:
        self.mean = torch.tensor(0.0)
        self.var = torch.tensor(1.0)
        self.std = torch.tensor(1.0)
        self.count = 1e-24  # not 0: the first update then needs no special case

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold a batch in; return the batch's own mean and (unbiased) standard deviation."""
        batch_count = xs.numel()
        batch_var, batch_mean = torch.var_mean(xs.detach().float().cpu(), unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + batch_count
        old_sum = self.var * self.count + delta ** 2 * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.var = (old_sum + batch_var * batch_count) / total
        self.std = (self.var * total / (total - 1)).sqrt()
        self.count = total
        return batch_mean.item(), (batch_var * batch_count / (batch_count - 1)).sqrt().item()


def normalize_scores(scores: torch.Tensor, running: RunningMoments, shift_mean: bool = True) -> torch.Tensor:
    """Update `running` with this batch's scores, then divide them by the running std (and, with
    `shift_mean`, subtract the running mean first): TRL's use_score_scaling (+ use_score_norm)."""
    running.update(scores)
    like = dict(dtype=scores.dtype, device=scores.device)
    scale = running.std.to(**like) + torch.finfo(scores.dtype).eps
    if shift_mean:
        return (scores - running.mean.to(**like)) / scale
    return scores / scale


class FixedKLController:
    def __init__(self, kl_coef: float = DEFAULTS.init_kl_coef) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019)'s controller: the KL coefficient grows while the policy drifts further from the
    reference than `target` and shrinks while it stays closer, by at most 20% per `horizon` samples."""

    def __init__(self, init_kl_coef: float = DEFAULTS.init_kl_coef, target: float = DEFAULTS.target,
                 horizon: float = DEFAULTS.horizon) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl` is the batch's mean per-sequence KL (`mean_sequence_kl`); `n_steps` the number of
        sequences it came from (TRL passes batch_size x world size)."""
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def kl_controller(hparams: PPOHyperparameters = DEFAULTS) -> Union[AdaptiveKLController, FixedKLController]:
    if hparams.adap_kl_ctrl:
        return AdaptiveKLController(hparams.init_kl_coef, hparams.target, hparams.horizon)
    return FixedKLController(hparams.init_kl_coef)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last real response token."""
    real = mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("every response needs at least one real token")
    return mask.shape[1] - 1 - real.flip(1).float().argmax(dim=1)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL estimate on every token, plus the sequence's score on its last one.

    The KL estimate is logprob - ref_logprob (TRL's kl_penalty "kl"). Both results are zero on padding
    (TRL leaves values there but masks them wherever they are used).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.reshape(-1).to(rewards.dtype)
    return rewards, kl


def mean_sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch mean of each sequence's summed KL: TRL's `objective/kl`, what the KL controller reads."""
    return (kl * mask).sum(dim=-1).mean()


def advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                           gamma: float = DEFAULTS.gamma, lam: float = DEFAULTS.lam,
                           whiten_rewards: bool = DEFAULTS.whiten_rewards) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over the response, then the advantages whitened.

    returns = advantages + values (before whitening) are the value head's targets. Padding is zeroed in
    values and rewards first, so the step after a response's last token contributes nothing.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    length = rewards.shape[-1]
    advantage = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        advantages[:, t] = advantage
    returns = advantages + values
    return whiten(advantages, mask).detach(), returns


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
             cliprange: float = DEFAULTS.cliprange, cliprange_value: float = DEFAULTS.cliprange_value,
             vf_coef: float = DEFAULTS.vf_coef, ratio_threshold: float = DEFAULTS.ratio_threshold
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss plus vf_coef x the clipped value loss, and TRL's statistics of them.

    `logprobs` and `values` come from the model being trained; `old_*` from the rollout. When the mean
    probability ratio exceeds `ratio_threshold` the policy has moved too far for the rollout to say
    anything about it, so the loss is zeroed (TRL skips the minibatch the same way).
    """
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    value_losses = (values - returns) ** 2
    value_losses_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(value_losses, value_losses_clipped), mask)
    value_clipfrac = masked_mean((value_losses_clipped > value_losses).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    policy_losses = -advantages * ratio
    policy_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(policy_losses, policy_losses_clipped), mask)
    policy_clipfrac = masked_mean((policy_losses_clipped > policy_losses).float(), mask)

    mean_ratio = masked_mean(ratio, mask)
    if mean_ratio.item() > ratio_threshold:
        logger.warning("the mean probability ratio of this batch (%.2f) exceeds %.2f: skipping it",
                       mean_ratio.item(), ratio_threshold)
        policy_loss, value_loss = policy_loss * 0.0, value_loss * 0.0
    loss = policy_loss + vf_coef * value_loss

    stats = {
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "loss/total": loss,
        "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": policy_clipfrac,
        "policy/advantages_mean": masked_mean(advantages, mask),
        "returns/mean": masked_mean(returns, mask),
        "returns/var": masked_var(returns, mask),
        "val/vpred": masked_mean(values, mask),
        "val/error": masked_mean((values - returns) ** 2, mask),
        "val/clipfrac": value_clipfrac,
        "val/mean": masked_mean(old_values, mask),
        "val/var": masked_var(old_values, mask),
    }
    return loss, {name: value.detach().float() for name, value in stats.items()}
