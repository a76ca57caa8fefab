"""The scheduler alone, without a model: admission, slots, budgets, aborts and groups."""
import random
from dataclasses import dataclass, field
from itertools import count

import pytest

from danlu.serving.scheduler import QueueFull, Scheduler

ids = count()


@dataclass
class Job:
    prompt_ids: list = field(default_factory=lambda: [1, 2, 3])
    id: int = field(default_factory=ids.__next__)
    slot: int = -1


def test_admits_in_order_into_distinct_slots_and_decodes_the_rest():
    scheduler = Scheduler(max_running=2, max_waiting=4)
    jobs = [Job() for _ in range(3)]
    for job in jobs:
        scheduler.add(job)
    first = scheduler.schedule()
    assert first.prefill == jobs[:2] and not first.decode and {j.slot for j in jobs[:2]} == {0, 1}
    second = scheduler.schedule()
    assert second.prefill == [] and second.decode == jobs[:2]  # no slot for the third
    scheduler.finish(jobs[0])
    third = scheduler.schedule()
    assert third.prefill == [jobs[2]] and jobs[2].slot == 0 and jobs[0].slot == -1
    assert scheduler.check_invariants() is None


def test_prefill_token_budget_admits_at_least_one_prompt():
    scheduler = Scheduler(max_running=4, max_waiting=4, prefill_token_budget=5)
    long, short = Job(prompt_ids=list(range(9))), Job(prompt_ids=[1])
    scheduler.add(long)
    scheduler.add(short)
    assert scheduler.schedule().prefill == [long]  # over the budget alone: still admitted, nothing else
    assert scheduler.schedule().prefill == [short]


def test_a_group_is_queued_whole_or_not_at_all():
    scheduler = Scheduler(max_running=1, max_waiting=3)
    scheduler.add(Job())
    with pytest.raises(QueueFull, match="3 more do not fit"):
        scheduler.add_group([Job(), Job(), Job()])
    assert scheduler.load["waiting"] == 1


def test_aborts_free_waiting_and_running_requests_at_the_next_step():
    scheduler = Scheduler(max_running=1, max_waiting=2)
    running, waiting = Job(), Job()
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    scheduler.abort(running.id)
    scheduler.abort(waiting.id)
    step = scheduler.schedule()
    assert set(map(id, step.aborted)) == {id(running), id(waiting)} and running.slot == -1
    assert scheduler.load == {"running": 0, "waiting": 0, "slots": 1, "free_slots": 1}
    scheduler.abort(12345)  # unknown or already ended: nothing happens
    assert scheduler.schedule().empty


def test_slots_stay_consistent_under_random_admissions_finishes_aborts_and_failures():
    scheduler, rng, alive = Scheduler(max_running=3, max_waiting=5), random.Random(0), []
    for _ in range(500):
        action = rng.random()
        if action < 0.4:
            try:
                scheduler.add(Job(prompt_ids=[1] * rng.randint(1, 9)))
            except QueueFull:
                pass
        elif action < 0.6 and alive:
            scheduler.finish(alive.pop(rng.randrange(len(alive))))
        elif action < 0.75 and alive:
            scheduler.abort(rng.choice(alive).id)
        elif action < 0.78:
            scheduler.fail_running()
        step = scheduler.schedule()
        alive = [j for j in alive + step.prefill if j.slot >= 0 and j not in step.aborted]
        assert scheduler.check_invariants() is None
        assert len({j.slot for j in alive}) == len(alive) == scheduler.load["running"]
