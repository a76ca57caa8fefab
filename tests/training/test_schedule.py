import math

import pytest
import torch
from transformers import get_scheduler

from danlu.training.schedule import build_scheduler


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(o, kind, 4, 20))
    theirs = lrs(lambda o: get_scheduler(kind, o, num_warmup_steps=4, num_training_steps=20))
    assert ours == pytest.approx(theirs)
    assert not any(math.isnan(x) for x in ours)


def test_causal_lm_loss_equals_transformers_shifted_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    from danlu.data.collate import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    ours, count = causal_lm_loss(logits, labels)
    assert count == 2 * 6 - 2
    assert torch.allclose(ours, ForCausalLMLoss(logits, labels, vocab_size=11))
