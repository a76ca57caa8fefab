"""Which requests run next: admission, slots, aborts and retirement, and nothing else (vLLM's scheduler idea).

Pure bookkeeping, testable without a model: the engine asks `schedule()` what to prefill, what to decode and what
was aborted, runs the model, and reports each end back with `finish()`. Every change of a request's state goes
through here, under one lock, so a slot is taken in exactly one place and given back in exactly one place —
whatever fails in between, `finish()` (or `fail_running()`) returns it.

Clients call `add` and `abort` from their own threads; the engine thread calls the rest.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Protocol


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: the client should retry later."""


class Schedulable(Protocol):
    id: int
    prompt_ids: list[int]
    slot: int


@dataclass
class Schedule:
    """One step's work: new requests to prefill (slots assigned), running ones to decode, ones aborted."""
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    aborted: list = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.aborted)


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, prefill_token_budget: int = 4096):
        if max_running < 1 or max_waiting < 0 or prefill_token_budget < 1:
            raise ValueError(f"max_running ({max_running}) and prefill_token_budget ({prefill_token_budget}) must "
                             f"be positive, max_waiting ({max_waiting}) non-negative")
        self.max_running, self.max_waiting = max_running, max_waiting
        self.prefill_token_budget = prefill_token_budget  # prompt tokens admitted in one step (at least one prompt)
        self.waiting: deque = deque()
        self.running: dict[int, Schedulable] = {}
        self.free_slots = list(range(max_running - 1, -1, -1))  # pop() gives slot 0 first
        self._aborted: set[int] = set()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    # ---------------------------------------------------------------- client threads

    def add(self, request: Schedulable) -> None:
        """Queue `request`; QueueFull when max_waiting are already waiting."""
        self.add_group([request])

    def add_group(self, requests: list) -> None:
        """Queue all of `requests` or none (the n choices of one API call, its list of prompts)."""
        with self._lock:
            if len(self.waiting) + len(requests) > self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting "
                                f"(at most {self.max_waiting}); {len(requests)} more do not fit")
            for request in requests:
                request.slot = -1
                self.waiting.append(request)
            self._work.notify()

    def abort(self, request_id: int) -> None:
        """End a request at the next step, waiting or running (a client that went away)."""
        with self._lock:
            if request_id in self.running or any(r.id == request_id for r in self.waiting):
                self._aborted.add(request_id)
                self._work.notify()

    # ---------------------------------------------------------------- engine thread

    def wait_for_work(self, timeout: float) -> bool:
        with self._lock:
            if not (self.waiting or self.running):
                self._work.wait(timeout)
            return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        """Take aborted requests out (their slots back), then admit waiting prompts into free slots within the
        prefill token budget; everything else running decodes."""
        with self._lock:
            step = Schedule()
            for request in [r for r in self.waiting if r.id in self._aborted]:
                self.waiting.remove(request)
                step.aborted.append(request)
            for request_id in [i for i in self.running if i in self._aborted]:
                step.aborted.append(self._release(self.running[request_id]))
            self._aborted.clear()
            step.decode = list(self.running.values())
            budget = self.prefill_token_budget
            while self.waiting and self.free_slots:
                request = self.waiting[0]
                if step.prefill and len(request.prompt_ids) > budget:
                    break
                self.waiting.popleft()
                request.slot = self.free_slots.pop()
                self.running[request.id] = request
                step.prefill.append(request)
                budget -= len(request.prompt_ids)
            return step

    def finish(self, request: Schedulable) -> None:
        """`request` is done (stopped, at its length, failed): its slot is free again."""
        with self._lock:
            if request.id in self.running:
                self._release(request)

    def fail_running(self) -> list:
        """Every running request, released (the model step failed for all of them)."""
        with self._lock:
            return [self._release(r) for r in list(self.running.values())]

    def drain(self) -> list:
        """Every request, waiting or running, released: the engine is shutting down."""
        with self._lock:
            waiting = list(self.waiting)
            self.waiting.clear()
            return waiting + [self._release(r) for r in list(self.running.values())]

    def _release(self, request: Schedulable):
        del self.running[request.id]
        self.free_slots.append(request.slot)
        request.slot = -1
        return request

    # ---------------------------------------------------------------- what /health and /metrics show

    @property
    def load(self) -> dict:
        with self._lock:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.max_running,
                    "free_slots": len(self.free_slots)}

    def check_invariants(self) -> Optional[str]:
        """A description of what is wrong with the slots, or None: every slot is free or held by one running
        request."""
        with self._lock:
            held = [r.slot for r in self.running.values()]
            slots = sorted(held + self.free_slots)
            if slots != list(range(self.max_running)):
                return f"slots held {sorted(held)} and free {sorted(self.free_slots)} are not 0..{self.max_running - 1}"
            return None
