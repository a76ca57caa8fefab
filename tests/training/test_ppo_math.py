"""PPO arithmetic against references written out from TRL 0.9's formulas, one row and one timestep at a time."""
import math

import pytest
import torch

from danlu.training.ppo import (DEFAULTS, AdaptiveKLController, FixedKLController, PPOHyperparameters,
                                RunningMoments, advantages_and_returns, kl_controller, mean_sequence_kl,
                                normalize_scores, ppo_loss, token_rewards, whiten)

LENGTHS = [5, 1, 8, 3]
T = 8


def ragged_mask(lengths=LENGTHS, width=T, hole=True) -> torch.Tensor:
    """Right-padded response masks; with `hole`, one row has a masked-out token inside (TRL's response_masks)."""
    mask = torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if hole:
        mask[2, 3] = 0
    return mask


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masked_entries(values, mask):
    return [values[r, t].item() for r in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[r, t]]


def reference_mean_var(entries):
    mean = sum(entries) / len(entries)
    return mean, sum((x - mean) ** 2 for x in entries) / (len(entries) - 1)


def reference_whiten(values, mask, shift_mean=True):
    mean, var = reference_mean_var(masked_entries(values, mask))
    out = torch.empty_like(values)
    for r in range(values.shape[0]):
        for t in range(values.shape[1]):
            out[r, t] = (values[r, t] - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    return out


def reference_masked_mean(values, mask):
    entries = masked_entries(values, mask)
    return sum(entries) / len(entries)


# whiten


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_equals_reference(shift_mean):
    values, mask = random(4, T, seed=0) * 3 + 2, ragged_mask()
    torch.testing.assert_close(whiten(values, mask, shift_mean), reference_whiten(values, mask, shift_mean))


def test_whitened_masked_entries_have_mean_zero_and_std_one():
    values, mask = random(4, T, seed=1) * 5 - 7, ragged_mask()
    values[mask == 0] = 1e6  # padding must not count
    entries = torch.tensor(masked_entries(whiten(values, mask), mask), dtype=torch.float64)
    assert abs(entries.mean().item()) < 1e-9
    assert abs(entries.std().item() - 1) < 1e-6


def test_whiten_without_shift_keeps_the_mean():
    values, mask = random(4, T, seed=2) + 3, ragged_mask()
    assert reference_masked_mean(whiten(values, mask, shift_mean=False), mask) == pytest.approx(
        reference_masked_mean(values, mask))


def test_whiten_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="no token"):
        whiten(torch.ones(2, 3), torch.zeros(2, 3))


# running moments of the scores


def test_running_moments_equal_the_moments_of_everything_seen():
    running = RunningMoments()
    batches = [random(n, seed=10 + n).float() * 2 + 1 for n in (4, 7, 3)]
    for i, batch in enumerate(batches):
        batch_mean, batch_std = running.update(batch)
        assert batch_mean == pytest.approx(batch.mean().item(), abs=1e-6)
        assert batch_std == pytest.approx(batch.std().item(), rel=1e-5)
        seen = torch.cat(batches[:i + 1]).double()
        assert running.mean.item() == pytest.approx(seen.mean().item(), abs=1e-5)
        assert running.std.item() == pytest.approx(seen.std().item(), rel=1e-5)
        assert running.count == pytest.approx(len(seen))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_normalize_scores_uses_the_running_moments_after_the_update(shift_mean):
    running = RunningMoments()
    normalize_scores(random(5, seed=20).float(), running)
    scores = random(6, seed=21).float() * 3
    seen = torch.cat([random(5, seed=20), random(6, seed=21) * 3])
    scale = seen.std().item() + torch.finfo(torch.float32).eps
    expected = [((s - seen.mean().item()) if shift_mean else s) / scale for s in scores.tolist()]
    got = normalize_scores(scores, running, shift_mean)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# KL controllers


def test_defaults_are_trl_ppo_config_defaults():
    assert (DEFAULTS.init_kl_coef, DEFAULTS.adap_kl_ctrl, DEFAULTS.target, DEFAULTS.horizon) == (0.2, True, 6, 10000)
    assert (DEFAULTS.gamma, DEFAULTS.lam, DEFAULTS.cliprange, DEFAULTS.cliprange_value, DEFAULTS.vf_coef) == (
        1, 0.95, 0.2, 0.2, 0.1)


@pytest.mark.parametrize("current_kl, proportional_error", [
    (6.6, 0.1),  # 10% over target
    (5.4, -0.1),  # 10% under
    (6.0, 0.0),
    (600.0, 0.2),  # clipped at +20%
    (-3.0, -0.2),  # the estimate can go negative; clipped at -20%
])
def test_adaptive_kl_coefficient_follows_the_kl_clipped_at_20_percent(current_kl, proportional_error):
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6, horizon=512)
    controller.update(current_kl, n_steps=256)  # n_steps / horizon = 0.5
    assert controller.value == pytest.approx(0.2 * (1 + proportional_error * 0.5))


def test_adaptive_kl_goes_up_above_target_and_down_below():
    controller = AdaptiveKLController()
    start = controller.value
    controller.update(DEFAULTS.target * 2, n_steps=128)
    assert controller.value > start
    raised = controller.value
    controller.update(DEFAULTS.target / 2, n_steps=128)
    assert controller.value < raised


def test_fixed_kl_and_the_choice_between_them():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 128)
    assert fixed.value == 0.05
    assert isinstance(kl_controller(), AdaptiveKLController)
    chosen = kl_controller(PPOHyperparameters(adap_kl_ctrl=False, init_kl_coef=0.3))
    assert isinstance(chosen, FixedKLController) and chosen.value == 0.3


# rewards


def reference_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    rewards, kls = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    for r in range(mask.shape[0]):
        last = max(t for t in range(mask.shape[1]) if mask[r, t])
        for t in range(mask.shape[1]):
            if mask[r, t]:
                kls[r, t] = logprobs[r, t] - ref_logprobs[r, t]
                rewards[r, t] = -kl_coef * kls[r, t]
        rewards[r, last] += scores[r]
    return rewards, kls


def test_token_rewards_equal_reference():
    mask = ragged_mask()
    logprobs, ref_logprobs = -random(4, T, seed=30).abs(), -random(4, T, seed=31).abs()
    scores = random(4, seed=32)
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.2)
    expected_rewards, expected_kl = reference_token_rewards(scores, logprobs, ref_logprobs, mask, 0.2)
    torch.testing.assert_close(rewards, expected_rewards)
    torch.testing.assert_close(kl, expected_kl)
    assert mean_sequence_kl(kl, mask).item() == pytest.approx(
        sum(sum(masked_entries(expected_kl[r:r + 1], mask[r:r + 1])) for r in range(4)) / 4)


def test_the_score_lands_on_the_last_real_token():
    mask = ragged_mask(hole=False)
    zeros = torch.zeros(4, T)
    rewards, _ = token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), zeros, zeros, mask, kl_coef=0.2)
    for row, n in enumerate(LENGTHS):
        assert rewards[row].nonzero().flatten().tolist() == [n - 1]
        assert rewards[row, n - 1] == row + 1


def test_a_response_without_tokens_is_refused():
    mask = ragged_mask()
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one"):
        token_rewards(torch.zeros(4), torch.zeros(4, T), torch.zeros(4, T), mask, kl_coef=0.2)


# advantages and returns


def reference_gae(values, rewards, mask, gamma, lam, whiten_rewards):
    values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = reference_whiten(rewards, mask, shift_mean=False)
    advantages = torch.zeros_like(rewards)
    for r in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            next_value = values[r, t + 1].item() if t + 1 < rewards.shape[1] else 0.0
            delta = rewards[r, t].item() + gamma * next_value - values[r, t].item()
            running = delta + gamma * lam * running
            advantages[r, t] = running
    returns = advantages + values
    return reference_whiten(advantages, mask), returns


@pytest.mark.parametrize("gamma, lam, whiten_rewards", [(1.0, 0.95, False), (0.9, 0.8, False), (1.0, 0.95, True)])
def test_advantages_and_returns_equal_reference(gamma, lam, whiten_rewards):
    mask = ragged_mask()
    values, rewards = random(4, T, seed=40), random(4, T, seed=41)
    advantages, returns = advantages_and_returns(values, rewards, mask, gamma, lam, whiten_rewards)
    expected_advantages, expected_returns = reference_gae(values, rewards, mask, gamma, lam, whiten_rewards)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_with_lam_1_gamma_1_and_no_values_returns_are_reward_to_go():
    mask = ragged_mask(hole=False)
    rewards = random(4, T, seed=50) * mask
    _, returns = advantages_and_returns(torch.zeros(4, T, dtype=torch.float64), rewards, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns * mask, reward_to_go * mask)


def test_advantages_are_whitened_over_the_mask():
    mask = ragged_mask()
    advantages, _ = advantages_and_returns(random(4, T, seed=60), random(4, T, seed=61), mask)
    entries = torch.tensor(masked_entries(advantages, mask), dtype=torch.float64)
    assert abs(entries.mean().item()) < 1e-9 and abs(entries.std().item() - 1) < 1e-6


# the loss


def reference_ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask, cliprange,
                       cliprange_value, vf_coef):
    """TRL's PPOTrainer.loss, one token at a time."""
    vf, pg, vf_clipped, pg_clipped, ratios = [], [], [], [], []
    for r in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[r, t]:
                continue
            v, old_v, ret, adv = values[r, t].item(), old_values[r, t].item(), returns[r, t].item(), advantages[r, t].item()
            v_clip = min(max(v, old_v - cliprange_value), old_v + cliprange_value)
            loss_v, loss_v_clip = (v - ret) ** 2, (v_clip - ret) ** 2
            vf.append(max(loss_v, loss_v_clip))
            vf_clipped.append(float(loss_v_clip > loss_v))
            ratio = math.exp(logprobs[r, t].item() - old_logprobs[r, t].item())
            ratios.append(ratio)
            loss_p, loss_p_clip = -adv * ratio, -adv * min(max(ratio, 1 - cliprange), 1 + cliprange)
            pg.append(max(loss_p, loss_p_clip))
            pg_clipped.append(float(loss_p_clip > loss_p))

    def mean(xs):
        return sum(xs) / len(xs)

    diffs = [logprobs[r, t].item() - old_logprobs[r, t].item()
             for r in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[r, t]]
    policy_loss, value_loss = mean(pg), 0.5 * mean(vf)
    return policy_loss + vf_coef * value_loss, {
        "loss/policy": policy_loss, "loss/value": value_loss, "loss/total": policy_loss + vf_coef * value_loss,
        "policy/approxkl": 0.5 * mean([d * d for d in diffs]), "policy/policykl": mean([-d for d in diffs]),
        "policy/clipfrac": mean(pg_clipped), "policy/advantages_mean": reference_masked_mean(advantages, mask),
        "returns/mean": reference_masked_mean(returns, mask),
        "returns/var": reference_mean_var(masked_entries(returns, mask))[1],
        "val/vpred": reference_masked_mean(values, mask),
        "val/error": mean([(v - ret) ** 2 for v, ret in zip(masked_entries(values, mask),
                                                             masked_entries(returns, mask))]),
        "val/clipfrac": mean(vf_clipped), "val/mean": reference_masked_mean(old_values, mask),
        "val/var": reference_mean_var(masked_entries(old_values, mask))[1],
    }


def loss_inputs(seed, spread=0.3):
    mask = ragged_mask()
    old_logprobs = -random(4, T, seed=seed).abs()
    logprobs = old_logprobs + spread * random(4, T, seed=seed + 1)  # ratios both inside and outside the clip
    old_values = random(4, T, seed=seed + 2)
    values = old_values + spread * random(4, T, seed=seed + 3)
    advantages, returns = random(4, T, seed=seed + 4), random(4, T, seed=seed + 5)
    return logprobs, old_logprobs, values, old_values, advantages, returns, mask


@pytest.mark.parametrize("cliprange, cliprange_value, vf_coef", [(0.2, 0.2, 0.1), (0.1, 0.1, 1.0)])
def test_ppo_loss_and_stats_equal_reference(cliprange, cliprange_value, vf_coef):
    inputs = loss_inputs(seed=70)
    loss, stats = ppo_loss(*inputs, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)
    expected_loss, expected_stats = reference_ppo_loss(*inputs, cliprange, cliprange_value, vf_coef)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    assert stats.keys() == expected_stats.keys()
    for name, value in expected_stats.items():
        assert stats[name].dtype == torch.float32 and stats[name].dim() == 0
        assert stats[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["val/clipfrac"] < 1  # both branches were exercised


def test_at_the_rollout_policy_the_ratio_is_one_and_nothing_is_clipped():
    _, old_logprobs, values, old_values, advantages, returns, mask = loss_inputs(seed=80)
    _, stats = ppo_loss(old_logprobs.clone(), old_logprobs, values, old_values, advantages, returns, mask)
    assert stats["policy/clipfrac"] == 0
    assert stats["policy/approxkl"] == 0 and stats["policy/policykl"] == 0
    assert stats["loss/policy"].item() == pytest.approx(-reference_masked_mean(advantages, mask))


def test_the_loss_reaches_the_policy_and_the_value_head():
    logprobs, old_logprobs, values, old_values, advantages, returns, mask = loss_inputs(seed=90)
    logprobs.requires_grad_(True)
    values.requires_grad_(True)
    loss, _ = ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask)
    loss.backward()
    assert logprobs.grad.abs().sum() > 0 and values.grad.abs().sum() > 0
    assert (logprobs.grad[mask == 0] == 0).all() and (values.grad[mask == 0] == 0).all()


def test_a_runaway_ratio_skips_the_batch():
    logprobs, old_logprobs, values, old_values, advantages, returns, mask = loss_inputs(seed=100)
    loss, stats = ppo_loss(old_logprobs + 3.0, old_logprobs, values, old_values, advantages, returns, mask)
    assert loss.item() == 0 and stats["loss/policy"] == 0 and stats["loss/value"] == 0
