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

