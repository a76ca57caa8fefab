"""Each distillation loss equals its reference: TextBrewer's own function (kd_ce_loss, hid_mse_loss, cos_loss,
pkd_loss, att_mse_loss), TRL's GKD generalized_jsd_loss, or the paper's formula written out here."""
import pytest
import textbrewer.losses as textbrewer_losses  # the test extra installs the peers: never skipped
import torch
import torch.nn.functional as F
from trl.experimental.gkd.gkd_trainer import GKDTrainer

from danlu.distillation import losses


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3


@pytest.fixture
def mask():
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_soft_cross_entropy_is_textbrewers_kd_ce_loss(logits, temperature):
    student, teacher = logits
    ours = losses.soft_cross_entropy(student, teacher, temperature)
    torch.testing.assert_close(ours, textbrewer_losses.kd_ce_loss(student, teacher, temperature))


def test_masked_soft_cross_entropy_averages_the_positions_that_count(logits, mask):
    student, teacher = logits
    kept = mask.bool()
    expected = textbrewer_losses.kd_ce_loss(student[kept], teacher[kept], 2.0)
    torch.testing.assert_close(losses.soft_cross_entropy(student, teacher, 2.0, mask), expected)


def test_hidden_mse_is_textbrewers_hid_mse_loss(mask):
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.testing.assert_close(losses.hidden_mse(student, teacher), textbrewer_losses.hid_mse_loss(student, teacher))
    torch.testing.assert_close(losses.hidden_mse(student, teacher, mask),
                               textbrewer_losses.hid_mse_loss(student, teacher, mask))


def test_cosine_loss_is_textbrewers_cos_loss(mask):
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.testing.assert_close(losses.cosine_loss(student, teacher), textbrewer_losses.cos_loss(student, teacher))
    torch.testing.assert_close(losses.cosine_loss(student, teacher, mask),
                               textbrewer_losses.cos_loss(student, teacher, mask))


def test_normalized_mse_on_cls_vectors_is_textbrewers_pkd_loss():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    torch.testing.assert_close(losses.normalized_mse(student[:, 0], teacher[:, 0]),
                               textbrewer_losses.pkd_loss(student, teacher))


def test_normalized_mse_is_the_patient_kd_formula():
    torch.manual_seed(4)
    student, teacher = torch.randn(7, 8), torch.randn(7, 8)
    by_hand = sum(((s / s.norm() - t / t.norm()) ** 2).sum() for s, t in zip(student, teacher)) / 7
    torch.testing.assert_close(losses.normalized_mse(student, teacher), by_hand)


def test_attention_mse_with_a_padding_mask_is_textbrewers_att_mse_loss(mask):
    torch.manual_seed(5)
    student, teacher = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    allowed = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    torch.testing.assert_close(losses.attention_mse(student, teacher, allowed),
                               textbrewer_losses.att_mse_loss(student, teacher, mask))


def test_attention_mse_is_the_tinybert_formula_over_causal_pairs():
    torch.manual_seed(6)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    per_head = [F.mse_loss(student[:, h][causal[0].expand(2, 4, 4)], teacher[:, h][causal[0].expand(2, 4, 4)])
                for h in range(3)]
    torch.testing.assert_close(losses.attention_mse(student, teacher, causal), sum(per_head) / 3)


def test_attention_mse_refuses_a_different_number_of_heads():
    with pytest.raises(ValueError, match="number of heads"):
        losses.attention_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_is_trls_gkd_loss(logits, mask, beta, temperature):
    student, teacher = logits
    labels = torch.where(mask.bool(), 1, -100)
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(losses.generalized_jsd(student, teacher, beta, temperature, mask), expected)


def test_forward_kl_is_soft_cross_entropy_minus_the_teachers_entropy(logits):
    student, teacher = logits
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(losses.divergence("forward_kl", student, teacher),
                               losses.divergence("ce", student, teacher) - entropy)


def test_reverse_kl_is_kl_of_the_student_from_the_teacher(logits):
    student, teacher = logits
    expected = F.kl_div(teacher.log_softmax(-1), student.log_softmax(-1), reduction="none",
                        log_target=True).sum(-1).mean()
    torch.testing.assert_close(losses.divergence("reverse_kl", student, teacher), expected)


def test_every_divergence_is_zero_for_a_perfect_student_but_ce(logits):
    _, teacher = logits
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert losses.divergence(kind, teacher, teacher).abs() < 1e-6


def test_unknown_divergence_and_bad_beta_are_refused(logits):
    student, teacher = logits
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*forward_kl"):
        losses.divergence("kl", student, teacher)
    with pytest.raises(ValueError, match="beta must be within"):
        losses.generalized_jsd(student, teacher, beta=1.5)
