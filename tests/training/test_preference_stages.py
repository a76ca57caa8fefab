"""The preference stages' steps on a tiny random model: DPO at step 0, the reference kinds, a reward model that
learns, PPO that raises its reward while staying near the reference."""
import copy
import json
import math
import random

import pytest
import torch

from danlu.data.preference import TokenizedFeedback, TokenizedPair
from danlu.data.collate import collate_feedback, collate_pairs
from danlu.data.supervised import IGNORE_INDEX, Tokenized
from danlu.generation.sampling import GenerationConfig
from danlu.models.presets import get_preset
from danlu.models.transformer import Transformer
from danlu.models.value_head import attach_value_head
from danlu.training.loop import FitConfig, fit
from danlu.training.losses import dpo_loss
from danlu.training.optim import build_optimizer
from danlu.training.recipes.dpo import preference_step
from danlu.training.recipes.kto import kto_step
from danlu.training.recipes.ppo import PPOSettings, ppo_stage
from danlu.training.recipes.rm import reward_step, sequence_scores
from danlu.training.reference import Reference
from danlu.training.schedule import build_scheduler
from danlu.training.stage import Stage
from danlu.tuning.lora import LoRAConfig, apply_lora

VOCAB = 256


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny-llama"))
    model.init_weights()
    return model


def side(prompt, answer):
    return Tokenized(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 8))]
        chosen = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))]
        rejected = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))]
        pairs.append(TokenizedPair(side(prompt, chosen), side(prompt, rejected)))
    return pairs


def lora_model():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    return model


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_dpo_at_step_zero_has_equal_policy_and_reference(kind):
    model = lora_model()  # LoRA's B starts at zero: the policy is its reference
    batch = collate_pairs(random_pairs(4), pad_id=0)
    out = preference_step(model, batch, Reference(), kind=kind, beta=0.1)
    expected = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}[kind]
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["rewards/chosen"] == 0 and out.metrics["rewards/rejected"] == 0
    assert out.metrics["rewards/margins"] == 0


def test_reference_with_adapters_off_is_the_base_model_and_a_frozen_copy_keeps_the_start():
    base = tiny_model()
    model = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter
    batch = collate_pairs(random_pairs(3), pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    by_switch = Reference().run(model, lambda m: m(ids, attention_mask=mask))
    by_copy = Reference(tiny_model()).run(model, lambda m: m(ids, attention_mask=mask))
    torch.testing.assert_close(by_switch, base(ids, attention_mask=mask))
    torch.testing.assert_close(by_copy, base(ids, attention_mask=mask))
    assert not torch.allclose(model(ids, attention_mask=mask), by_switch)  # the adapters are back on after


def test_dpo_step_equals_the_formula_on_the_models_log_probs():
    model = lora_model()
    frozen = tiny_model(seed=1)  # a reference that differs from the policy
    batch = collate_pairs(random_pairs(4), pad_id=0)
    out = preference_step(model, batch, Reference(frozen), kind="sigmoid", beta=0.3, label_smoothing=0.1)

    def summed(m):
        logits = m(batch["input_ids"], attention_mask=batch["attention_mask"]).log_softmax(-1)
        labels = batch["labels"][:, 1:]
        picked = logits[:, :-1].gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (picked * (labels != IGNORE_INDEX)).sum(-1)

    with torch.no_grad():
        policy, reference = summed(model), summed(frozen)
    losses, _, _ = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.3, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_losses_need_no_reference(kind):
    out = preference_step(lora_model(), collate_pairs(random_pairs(2), pad_id=0), None, kind=kind, beta=0.1)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0
    assert "rewards/accuracies" in out.metrics


def test_kto_step_at_the_start_has_zero_rewards_and_kl():
    pairs = random_pairs(4)
    items = [TokenizedFeedback(p.chosen, pairs[i - 1].chosen, desirable=i % 2 == 0) for i, p in enumerate(pairs)]
    out = kto_step(lora_model(), collate_feedback(items, pad_id=0), Reference(), beta=0.1)
    assert out.loss.item() == pytest.approx(0.5, abs=1e-6)  # 1 - σ(0) for every item
    assert out.metrics["kl"] == 0 and out.metrics["rewards/chosen"] == 0


def marked_pairs(n, seed):
    """Pairs where the chosen answer contains the token 7 and the rejected one does not: learnable."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(10, VOCAB) for _ in range(4)]
        answer = [rng.randrange(10, VOCAB) for _ in range(5)]
        marked = list(answer)
        marked[rng.randrange(5)] = 7
        pairs.append(TokenizedPair(side(prompt, marked), side(prompt, answer)))
    return pairs


def test_a_reward_model_learns_a_learnable_preference(tmp_path):
    model = tiny_model()
    attach_value_head(model, bias=False)
    stage = Stage(marked_pairs(256, seed=0), marked_pairs(64, seed=1), lambda rows: collate_pairs(rows, 0),
                  reward_step, trained_modules=("v_head",))
    optimizer = build_optimizer(model, "adamw_torch", 3e-3)
    fit(model, stage, optimizer, build_scheduler(optimizer, "constant", 0, 300),
        FitConfig(tmp_path, max_steps=300, batch_size=8, logging_steps=50, save_steps=1000))
    model.eval()
    with torch.no_grad():
        held_out = collate_pairs(marked_pairs(64, seed=1), 0)
        chosen, rejected = sequence_scores(model, held_out).chunk(2)
    assert (chosen > rejected).float().mean().item() > 0.9


class LowTokens:
    """A computable reward: the share of answer tokens below VOCAB / 2 (half of them at random)."""

    def __call__(self, queries, responses):
        return torch.tensor([sum(t < VOCAB // 2 for t in r) / len(r) for r in responses])


class NoText:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_ppo_raises_the_reward_and_stays_near_the_reference(tmp_path):
    """A bandit the tiny model can learn within seconds: one answer token, rewarded when it is in the lower
    half of the vocabulary. (A random tiny model's tied head has too little range for LoRA to move, so the
    whole model trains against a frozen copy.)"""
    model = tiny_model()
    reference = Reference(copy.deepcopy(model))
    model.config.eos_token_id = None  # answers run to max_new_tokens
    prompts = [Tokenized([random.Random(i).randrange(3, VOCAB) for _ in range(6)], []) for i in range(64)]
    settings = PPOSettings(GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=0, top_p=1.0),
                           batch_size=8, accumulation=4, ppo_epochs=4, seed=0)
    stage = ppo_stage(model, NoText(), prompts, LowTokens(), reference, settings)
    optimizer = build_optimizer(model, "adamw_torch", 1e-2)
    result = fit(model, stage, optimizer, build_scheduler(optimizer, "constant", 0, 40),
                 FitConfig(tmp_path, max_steps=40, batch_size=8, gradient_accumulation_steps=4, logging_steps=4,
                           save_steps=1000))
    records = [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    rewards, kls = [r["reward"] for r in records], [r["objective/kl"] for r in records]
    assert result.state.global_step == 40 and len(rewards) == 10  # 10 rollouts of 32, 4 epochs each
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert max(kls) < 3.0, kls


def test_qlora_quantizes_the_backbone_but_keeps_the_value_head_trainable_in_float():
    from danlu.training.arguments import TrainArguments
    from danlu.training.finetuning import apply_finetuning

    model = tiny_model()
    attach_value_head(model, bias=False)
    apply_finetuning(model, TrainArguments(dataset="d", quantization_bit=4, lora_rank=4), ("v_head",))
    assert type(model.v_head.summary) is torch.nn.Linear and model.v_head.summary.weight.requires_grad
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "QuantizedLinear"
