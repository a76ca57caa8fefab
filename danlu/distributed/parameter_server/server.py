"""The parameter server: rank 0 holds the weights and the optimizer; workers pull weights and push gradients.

Every call from a worker runs in one of the RPC agent's threads; one lock orders them, so the updates are applied
one at a time in the order they arrive. A worker is free-running: it pulls, computes a gradient on its next batch
and pushes it, while the others do the same, so the gradient it pushes was computed on weights some updates old
(its delay, recorded per push). `delay > 0` injects more: a pull then hands out the weights of `delay` updates
ago. A worker not heard from (calls or heartbeats) for `worker_timeout` seconds is taken as lost: the server
says so and goes on with the others (a synchronous round then waits for the living only).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from danlu.distributed.parameter_server.rules import DELAY_COMPENSATED, UPDATE_RULES, DelayCompensation
from danlu.utils.progress import logger


@dataclass(frozen=True)
class Push:
    """One gradient the server applied: who computed it, at which version of the weights, applied to which."""
    worker: int
    pulled: int  # the server's version of the weights the gradient was computed on
    applied: int  # the version it was applied to (delay = applied - pulled)
    loss: float
    n_tokens: int
    seconds: float  # since the server started

    @property
    def delay(self) -> int:
        return self.applied - self.pulled


# on_update(version, pushes): after each update (one push, or a synchronous round's), under the server's lock
OnUpdate = Callable[[int, list[Push]], None]


class ParameterServer:
    def __init__(self, parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, workers: int,
                 max_updates: int, rule: str = "asgd", scheduler=None, dc_lambda: float = 0.04,
                 dc_momentum: float = 0.95, delay: int = 0, worker_timeout: float = 60.0,
                 on_update: Optional[OnUpdate] = None, version: int = 0, max_grad_norm: float = 0.0):
        if rule not in UPDATE_RULES:
            raise ValueError(f"ps_update: unknown rule {rule!r}; expected one of {', '.join(UPDATE_RULES)}")
        if workers < 1:
            raise ValueError(f"a parameter server needs at least one worker, got {workers}")
        if delay < 0:
            raise ValueError(f"ps_delay must be >= 0, got {delay}")
        self.parameters, self.optimizer, self.scheduler = list(parameters), optimizer, scheduler
        self.workers, self.max_updates, self.rule = workers, max_updates, rule
        self.compensation = DelayCompensation(rule, dc_lambda, dc_momentum) if rule in DELAY_COMPENSATED else None
        self.delay, self.worker_timeout, self.on_update = delay, worker_timeout, on_update
        self.max_grad_norm = max_grad_norm  # > 0: the gradient stepped on is clipped to this global norm
        self.version = version
        self.pushes: list[Push] = []
        self.lock = threading.Condition()
        self.started = time.monotonic()
        self.last_heard = {m: self.started for m in range(workers)}
        self.lost: set[int] = set()
        self.finished: set[int] = set()
        self.backups: dict[int, list[torch.Tensor]] = {}  # the weights each worker last pulled (DC-ASGD)
        self.history: deque = deque(maxlen=delay + 1)  # (version, weights) of the last updates (injected delay)
        if delay:
            self.history.append((version, self.snapshot()))
        self.round: dict[int, tuple[list[torch.Tensor], int, float, int]] = {}  # ssgd: this round's gradients
        self.rounds_done = 0
        self.applied_from = [0] * workers  # gradients applied from each worker (a resumed run: set from its state)
        self.error: Optional[BaseException] = None

    # --- what workers call (through RPC) ---

    def pull(self, worker: int) -> tuple[int, Optional[list[torch.Tensor]]]:
        """The version and weights worker `worker` is to compute its next gradient on; None when training is over."""
        with self.lock:
            self.heard_from(worker)
            if self.done_updating:
                return self.version, None
            version, weights = self.weights_to_hand_out()
            if self.compensation is not None:
                self.backups[worker] = weights
            return version, weights

    def push(self, worker: int, grads: list[torch.Tensor], pulled: int, loss: float, n_tokens: int = 0) -> bool:
        """Apply (or, synchronously, gather) worker `worker`'s gradient, computed on version `pulled`; False when
        training is over and the worker should stop."""
        with self.lock:
            self.heard_from(worker)
            if self.done_updating:
                return False
            if len(grads) != len(self.parameters):
                raise ValueError(f"worker {worker} pushed {len(grads)} gradients; the server holds "
                                 f"{len(self.parameters)} parameters")
            if self.rule == "ssgd":
                return self.join_round(worker, grads, pulled, loss, n_tokens)
            backup = self.backups.pop(worker, None)
            self.apply([grads], [Push(worker, pulled, self.version, loss, n_tokens, self.elapsed())], backup)
            return not self.done_updating

    def heartbeat(self, worker: int) -> None:
        with self.lock:
            self.heard_from(worker)

    def finish(self, worker: int) -> None:
        with self.lock:
            self.finished.add(worker)
            self.lock.notify_all()

    def fail(self, worker: int, reason: str) -> None:
        """Worker `worker` cannot go on (its step raised): lost at once, not after worker_timeout."""
        with self.lock:
            self.heard_from(worker)
            self.lose(worker, f"failed: {reason}")

    def start_clock(self) -> None:
        """The run starts now (every process has joined): seconds and silences count from here."""
        with self.lock:
            self.started = time.monotonic()
            self.last_heard = {m: self.started for m in range(self.workers)}

    # --- the server's own thread ---

    def wait(self, poll_seconds: float = 0.5) -> list[Push]:
        """Block until every update is applied and every living worker has finished; the pushes applied."""
        with self.lock:
            while not (self.done_updating and self.finished | self.lost >= set(range(self.workers))):
                if self.error is not None:
                    raise self.error
                self.lock.wait(poll_seconds)
                self.check_lost_workers()
            if self.error is not None:
                raise self.error
            return list(self.pushes)

    # --- inside, under the lock ---

    @property
    def done_updating(self) -> bool:
        return self.version >= self.max_updates or self.error is not None

    @property
    def living(self) -> set[int]:
        return set(range(self.workers)) - self.lost - self.finished

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def heard_from(self, worker: int) -> None:
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not one of this server's {self.workers} workers")
        self.last_heard[worker] = time.monotonic()
        if worker in self.lost:
            self.lost.discard(worker)
            logger.warning("parameter server: worker %d is heard from again; it is back in the run", worker)

    def check_lost_workers(self) -> None:
        now = time.monotonic()
        for worker in sorted(self.living):
            silent = now - self.last_heard[worker]
            if silent > self.worker_timeout:
                self.lose(worker, f"not heard from for {silent:.0f} s (ps_worker_timeout {self.worker_timeout:g})")

    def lose(self, worker: int, why: str) -> None:
        self.lost.add(worker)
        self.backups.pop(worker, None)
        self.round.pop(worker, None)
        others = self.workers - len(self.lost)
        logger.warning("parameter server: worker %d %s: taken as lost; going on with the %d other%s", worker, why,
                       others, "" if others == 1 else "s")
        if not self.living and not self.done_updating:
            self.error = RuntimeError(f"parameter server: every worker is lost after {self.version} of "
                                      f"{self.max_updates} updates; the run cannot finish")
        if self.round and set(self.round) >= self.living:
            self.close_round()
        self.lock.notify_all()

    def weights_to_hand_out(self) -> tuple[int, list[torch.Tensor]]:
        if self.delay:  # the oldest kept: `delay` updates ago, once that many were applied
            return self.history[0]
        return self.version, self.snapshot()

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in self.parameters]

    def join_round(self, worker: int, grads, pulled: int, loss: float, n_tokens: int) -> bool:
        """Synchronous SGD: wait until every living worker has pushed this round, then one averaged step."""
        self.round[worker] = (grads, pulled, loss, n_tokens)
        this_round = self.rounds_done
        if set(self.round) >= self.living:
            self.close_round()
        while self.rounds_done == this_round and self.error is None:
            self.lock.wait(0.5)
            self.check_lost_workers()
        if self.error is not None:
            raise self.error
        return not self.done_updating

    def close_round(self) -> None:
        gathered = [self.round[m] for m in sorted(self.round)]
        pushes = [Push(m, pulled, self.version, loss, n_tokens, self.elapsed())
                  for m, (_, pulled, loss, n_tokens) in sorted(self.round.items())]
        self.round = {}
        self.apply([grads for grads, *_ in gathered], pushes)
        self.rounds_done += 1
        self.lock.notify_all()

    def apply(self, gradients: list[list[torch.Tensor]], pushes: list[Push],
              backup: Optional[list[torch.Tensor]] = None) -> None:
        """One optimizer step on the mean of `gradients` (delay-compensated against `backup` for DC-ASGD)."""
        try:
            loss = sum(push.loss for push in pushes) / len(pushes)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at update {self.version + 1} (worker "
                                         f"{pushes[0].worker}); training stopped")
            for index, p in enumerate(self.parameters):
                grad = torch.stack([g[index] for g in gradients]).mean(0) if len(gradients) > 1 else gradients[0][index]
                grad = grad.to(device=p.device, dtype=p.dtype)
                if self.compensation is not None and backup is not None:
                    grad = self.compensation(index, grad, p.detach(), backup[index].to(p.device, p.dtype))
                p.grad = grad
            if self.max_grad_norm > 0:  # over the optimizer's parameters in its order, as the one loop clips
                torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                               self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.version += 1
            self.pushes.extend(pushes)
            for push in pushes:
                self.applied_from[push.worker] += 1
            if self.delay:
                self.history.append((self.version, self.snapshot()))
            if self.on_update is not None:
                self.on_update(self.version, pushes)
        except BaseException as e:  # every worker and the server's own thread learn of it
            self.error = e
            self.lock.notify_all()
            raise
