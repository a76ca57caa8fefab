"""danlu's preference losses (danlu/training/losses.py) against TRL's own code, on the same inputs.

Where TRL 1.13 keeps each formula, and how it is called here:

- DPO (sigmoid, hinge, ipo) and the per-sequence log-probs it compares: inside
  `trl.trainer.dpo_trainer.DPOTrainer._compute_loss(model, inputs, return_outputs)`; TRL 1.x has no separate
  `dpo_loss` method any more. It runs the model on the batch ([chosen rows; rejected rows], with a
  `completion_mask`), and with `precompute_ref_logps` takes the reference log-probs from the batch.
- KTO: `trl.trainer.kto_trainer.KTOTrainer._compute_loss` (promoted out of trl.experimental in 1.x), likewise
  running the model on the batch and on the mismatched KL batch; reference log-probs from the batch.
- SimPO (and cDPO's label-smoothed sigmoid): `trl.experimental.cpo.CPOTrainer.cpo_loss(chosen, rejected)`.
- ORPO's odds-ratio term: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss(chosen_avg, rejected_avg)`.
- Per-sequence log-probs from labels with -100 on the prompt: the static `CPOTrainer.get_batch_logps`.

A trainer is never constructed (that needs a model, a tokenizer, a dataset and an accelerate state): each one
is made with `object.__new__` and given only the attributes the method reads, with the values its `__init__`
would derive from the default config; the accelerator is a one-process stand-in whose gathers are the
identity. A renamed attribute in a later TRL fails here with an AttributeError naming it.

Known differences from TRL 1.13, on purpose (LLaMA-Factory's behaviour, which danlu mirrors):
- DPOTrainer's "sigmoid" ignores `label_smoothing` in 1.13 (it only feeds robust/exo_pair/aot); danlu keeps
  cDPO's smoothed sigmoid, as TRL's DPO did before 1.0 and as CPOTrainer's "sigmoid" still does, which is
  what it is compared with.
- ORPO's SFT term: TRL takes the token-mean NLL of prompt + answer over the whole chosen batch; danlu (like
  LLaMA-Factory) takes -mean log p of each chosen answer. Only the odds-ratio term is compared with TRL.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("trl")

from danlu.data.supervised import IGNORE_INDEX  # noqa: E402
from danlu.training.losses import (  # noqa: E402
    average_log_probs, dpo_loss, kto_loss, orpo_loss, sequence_log_probs, simpo_loss,
)

with warnings.catch_warnings():  # trl.experimental warns on import that its API may change
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

VOCAB, PAD = 13, 0
CLOSE = dict(rtol=1e-5, atol=1e-6)


class TinyLM(nn.Module):
    """A random causal-LM stand-in: logits from token and position embeddings, `.logits` like HF's output."""

    is_gradient_checkpointing = False  # read by TRL's disable_gradient_checkpointing around the reference

    def __init__(self, seed: int = 0, dim: int = 8, max_len: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens, self.positions = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask=None, **_):
        hidden = self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        return SimpleNamespace(logits=3 * self.head(torch.tanh(hidden)))


class OneProcess:
    """accelerate.Accelerator's surface that the loss methods touch, for a single CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def make_batch(shapes: list[tuple[int, int]], seed: int, width: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded rows of (prompt length, answer length): input_ids, attention_mask, completion_mask and
    danlu's labels (the answer's ids, IGNORE_INDEX on the prompt and the padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((len(shapes), width), PAD)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(shapes):
        input_ids[row, :prompt + answer] = torch.randint(1, VOCAB, (prompt + answer,), generator=generator)
        attention[row, :prompt + answer] = 1
        completion[row, prompt:prompt + answer] = 1
    labels = torch.where(completion.bool(), input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion, "labels": labels}


def danlu_log_probs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sequence_log_probs(model(batch["input_ids"]).logits, batch["labels"])


def trl_dpo(model: nn.Module, beta: float, loss_type: str) -> DPOTrainer:
    """DPOTrainer with what _compute_loss reads, as DPOConfig's defaults set it (precompute_ref_log_probs on)."""
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=OneProcess(), beta=beta, loss_types=[loss_type], loss_weights=[1.0],
        label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False,
        precompute_ref_logps=True, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    return trainer


def run_trl_dpo(trainer: DPOTrainer, batch: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict:
    """TRL's mean loss on the batch and its logged means (rewards, log-probs) of that step."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, dict(inputs, ref_chosen_logps=ref_chosen,
                                                         ref_rejected_logps=ref_rejected), return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss, **metrics}


# Three pairs of different prompt and answer lengths: chosen rows first, then rejected, as TRL batches them.
PAIRS = [((2, 5), (2, 3)), ((4, 2), (4, 6)), ((1, 7), (1, 4))]


@pytest.fixture(scope="module")
def pairs():
    model = TinyLM(seed=0)  # train mode: TRL logs under "train"
    batch = make_batch([c for c, _ in PAIRS] + [r for _, r in PAIRS], seed=1)
    summed, counts = danlu_log_probs(model, batch)
    ref_summed = summed + torch.tensor([-0.7, 1.3, 0.4, 0.9, -1.1, 0.2])  # a reference that disagrees
    return model, batch, summed, counts, ref_summed


def one_pair(batch: dict, i: int) -> dict:
    n = len(PAIRS)
    return {k: v[[i, n + i]] for k, v in batch.items()}


@pytest.mark.parametrize("kind,beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("hinge", 0.5), ("ipo", 0.3)])
def test_dpo_matches_trl_pair_by_pair(pairs, kind, beta):
    model, batch, summed, counts, ref_summed = pairs
    n = len(PAIRS)
    if kind == "ipo":  # IPO compares length-averaged log-probs; TRL divides by the answer's token count
        pc, pr = average_log_probs(summed, counts).split(n)
        rc, rr = average_log_probs(ref_summed, counts).split(n)
    else:
        (pc, pr), (rc, rr) = summed.split(n), ref_summed.split(n)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, kind)

    # TRL logs rewards from summed log-probs whatever the loss; danlu's follow the log-probs it is given, so for
    # IPO they are per answer token
    scale = counts.float() if kind == "ipo" else torch.ones(2 * n)
    trainer = trl_dpo(model, beta, kind)
    for i in range(n):  # one pair per call: TRL returns the batch mean, so this compares every pair's loss
        trl = run_trl_dpo(trainer, one_pair(batch, i), ref_summed[[i]], ref_summed[[n + i]])
        torch.testing.assert_close(losses[i], trl["loss"], **CLOSE)
        assert (chosen_rewards[i] * scale[i]).item() == pytest.approx(trl["rewards/chosen"], rel=1e-5, abs=1e-6)
        assert ((rejected_rewards[i] * scale[n + i]).item()
                == pytest.approx(trl["rewards/rejected"], rel=1e-5, abs=1e-6))
    whole = run_trl_dpo(trainer, batch, *ref_summed.split(n))
    torch.testing.assert_close(losses.mean(), whole["loss"], **CLOSE)


def test_dpo_sequence_log_probs_are_trls(pairs):
    """What DPOTrainer logs as logps/chosen and logps/rejected is what sequence_log_probs gives."""
    model, batch, summed, _, ref_summed = pairs
    n = len(PAIRS)
    trainer = trl_dpo(model, 0.1, "sigmoid")
    for i in range(n):
        trl = run_trl_dpo(trainer, one_pair(batch, i), ref_summed[[i]], ref_summed[[n + i]])
        assert summed[i].item() == pytest.approx(trl["logps/chosen"], rel=1e-5, abs=1e-6)
        assert summed[n + i].item() == pytest.approx(trl["logps/rejected"], rel=1e-5, abs=1e-6)


def test_sequence_and_average_log_probs_match_trl_get_batch_logps(pairs):
    """Labels with -100 on the prompt and the padding, log-probs of the next token summed or averaged."""
    model, batch, summed, counts, _ = pairs
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    labels = batch["labels"]
    torch.testing.assert_close(summed, CPOTrainer.get_batch_logps(logits, labels.clone()), **CLOSE)
    torch.testing.assert_close(average_log_probs(summed, counts),
                               CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True), **CLOSE)
    torch.testing.assert_close(counts, (labels[:, 1:] != IGNORE_INDEX).sum(-1))


def test_dpo_label_smoothing_is_cdpo_as_in_trl_cpo_sigmoid():
    """cDPO: -(1-ε) log σ(βh) - ε log σ(-βh). CPOTrainer's sigmoid is that formula on π_c - π_r; given the
    log-ratios π - ref it is DPO's with the same ε (TRL 1.13's DPOTrainer drops ε from its sigmoid)."""
    generator = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=generator) for _ in range(4))
    beta, eps = 0.3, 0.15
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=eps)
    cpo = object.__new__(CPOTrainer)
    cpo.__dict__.update(beta=beta, label_smoothing=eps, loss_type="sigmoid", alpha=0.0, accelerator=OneProcess())
    trl_losses, _, _ = cpo.cpo_loss(pc - rc, pr - rr)
    torch.testing.assert_close(losses, trl_losses, **CLOSE)


def test_simpo_matches_trl_cpo_simpo():
    generator = torch.Generator().manual_seed(3)
    chosen_avg, rejected_avg = -3 * torch.rand(8, generator=generator), -3 * torch.rand(8, generator=generator)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4), (10.0, 3.0)):
        cpo = object.__new__(CPOTrainer)
        cpo.__dict__.update(beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo", alpha=0.0,
                            accelerator=OneProcess())
        trl_losses, trl_chosen, trl_rejected = cpo.cpo_loss(chosen_avg, rejected_avg)
        torch.testing.assert_close(simpo_loss(chosen_avg, rejected_avg, beta, gamma), trl_losses, **CLOSE)


def test_orpo_odds_ratio_matches_trl():
    generator = torch.Generator().manual_seed(4)
    chosen_avg = -4 * torch.rand(8, generator=generator) - 1e-3  # log p < 0, as averaged log-probs are
    rejected_avg = -4 * torch.rand(8, generator=generator) - 1e-3
    beta = 0.1
    orpo = object.__new__(ORPOTrainer)
    orpo.__dict__.update(beta=beta, accelerator=OneProcess())
    trl_losses, _, _, trl_mean_ratio, trl_mean_log_odds = orpo.odds_ratio_loss(chosen_avg, rejected_avg)
    losses, sft, odds_ratio = orpo_loss(chosen_avg, rejected_avg, beta)
    # TRL's `losses` is β·log σ(log odds), subtracted from the NLL: danlu's odds-ratio loss is its negation
    torch.testing.assert_close(beta * odds_ratio, -trl_losses, **CLOSE)
    torch.testing.assert_close(odds_ratio.mean(), -trl_mean_ratio, **CLOSE)
    torch.testing.assert_close(losses, sft - trl_losses, **CLOSE)
    torch.testing.assert_close(sft, -chosen_avg)


@pytest.mark.parametrize("desirable_weight,undesirable_weight,kl_shift",
                         [(1.0, 1.0, 0.8), (1.0, 1.33, 0.8), (0.7, 1.0, -5.0)])
def test_kto_matches_trl(desirable_weight, undesirable_weight, kl_shift):
    """kl_shift moves the reference's KL-batch log-probs: 0.8 gives a positive KL estimate, -5 a negative one
    (clamped to 0 by both)."""
    model = TinyLM(seed=5)
    label = torch.tensor([1, 0, 0, 1, 0])
    batch = make_batch([(2, 4), (3, 3), (1, 6), (4, 2), (2, 5)], seed=6)
    kl_batch = make_batch([(2, 3), (3, 6), (1, 4), (4, 5), (2, 2)], seed=7)  # mismatched prompt/answer pairs
    summed, _ = danlu_log_probs(model, batch)
    kl_summed, _ = danlu_log_probs(model, kl_batch)
    ref = summed + torch.tensor([0.9, -0.4, 1.2, -1.5, 0.3])
    ref_kl = kl_summed - kl_shift
    beta = 0.1

    chosen, rejected = label.bool(), ~label.bool()
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        summed[chosen], summed[rejected], kl_summed, ref[chosen], ref[rejected], ref_kl, beta,
        desirable_weight, undesirable_weight)

    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=OneProcess(), beta=beta, loss_type="kto", desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, calculate_KL=True, precompute_ref_logps=True,
        use_liger_kernel=False, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    inputs.update(KL_input_ids=kl_batch["input_ids"], KL_attention_mask=kl_batch["attention_mask"],
                  KL_completion_mask=kl_batch["completion_mask"], label=label, ref_logps=ref, ref_KL_logps=ref_kl)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    torch.testing.assert_close(losses.mean(), trl_loss, **CLOSE)
    assert kl.item() == pytest.approx(logged["kl"], rel=1e-5, abs=1e-6)
    assert kl.item() == (0.0 if kl_shift < 0 else pytest.approx(kl_shift, rel=1e-4))
    assert chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(logged["rewards/rejected"], rel=1e-5, abs=1e-6)
    assert summed[chosen].mean().item() == pytest.approx(logged["logps/chosen"], rel=1e-5, abs=1e-6)


def test_dpo_at_step_zero_is_log_2_with_zero_rewards(pairs):
    """Before the first update the reference is a copy of the policy: every log-ratio is exactly 0, so the
    sigmoid loss is exactly log 2 (-log σ(0)) and both rewards exactly 0, in danlu and in TRL."""
    model, batch, summed, _, _ = pairs
    reference = copy.deepcopy(model)
    ref_summed, _ = danlu_log_probs(reference, batch)
    assert torch.equal(ref_summed, summed)
    n = len(PAIRS)
    for beta in (0.1, 0.5, 2.0):
        losses, chosen_rewards, rejected_rewards = dpo_loss(*summed.split(n), *ref_summed.split(n), beta)
        assert torch.equal(losses, torch.full_like(losses, math.log(2)))
        assert torch.equal(chosen_rewards, torch.zeros(n)) and torch.equal(rejected_rewards, torch.zeros(n))
        # TRL's own step 0: no precomputed log-probs, its reference model run beside the policy
        trainer = trl_dpo(model, beta, "sigmoid")
        trainer.__dict__.update(precompute_ref_logps=False, ref_model=reference,
                                args=SimpleNamespace(gradient_checkpointing_kwargs=None))
        with torch.no_grad():
            trl_loss = trainer._compute_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask",
                                                                           "completion_mask")}, False)
        assert torch.equal(trl_loss, torch.tensor(math.log(2)))
        logged = trainer._metrics["train"]
        assert logged["rewards/chosen"] == [0.0] and logged["rewards/rejected"] == [0.0]
