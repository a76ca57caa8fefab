"""The continuous-batching engine: one thread runs the loop schedule -> prefill new prompts -> decode everything
running, one token a step.

The scheduler (scheduler.py) decides and owns every slot; the runner (runner.py) computes; each request keeps its
own sampling state (generation/sequence.py). A request is validated completely before it may take a slot, and
whatever fails after that ends in `_end`, which gives the slot back and answers the client.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from danlu.generation.kv_cache import kv_values_per_token
from danlu.generation.sampling import GenerationConfig
from danlu.generation.sequence import SequenceState, TokenChoice
from danlu.serving.metrics import Metrics
from danlu.serving.prefix_cache import PrefixCache
from danlu.serving.runner import ModelRunner
from danlu.serving.scheduler import QueueFull, Scheduler
from danlu.utils.progress import logger

__all__ = ["Engine", "Event", "PromptTooLong", "QueueFull", "Request", "ShuttingDown"]


class PromptTooLong(ValueError):
    """The prompt (plus the asked-for tokens) does not fit the context."""


class ShuttingDown(RuntimeError):
    """The engine is stopping and takes no new requests."""


@dataclass
class Event:
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error" on the last event
    completion_tokens: int = 0
    error: Optional[str] = None
    tokens: list[TokenChoice] = field(default_factory=list)  # the tokens chosen since the previous event


@dataclass
class Request:
    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]  # called from the engine thread
    adapter: Optional[str] = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks), as vLLM's extension
    top_logprobs: Optional[int] = None  # None: no log-probs; k: each token's, with the k most likely
    id: int = field(default_factory=itertools.count().__next__)
    # engine-side state
    slot: int = -1
    state: Optional[SequenceState] = None
    last_token: int = 0
    unreported: list[TokenChoice] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    ended: bool = False

    @property
    def generated(self) -> list[int]:
        return self.state.generated if self.state is not None else []


def prefix_cache_for(model, mib: float, block_size: int = 16) -> Optional[PrefixCache]:
    """A prefix cache of at most `mib` MiB for the model's keys and values (None for 0: no prefix caching)."""
    if mib < 0:
        raise ValueError(f"the prefix cache size must be 0 (off) or more MiB, got {mib}")
    block_bytes = kv_values_per_token(model.config) * block_size * next(model.parameters()).element_size()
    blocks = int(mib * 2**20 // block_bytes)
    return PrefixCache(block_size, blocks) if blocks else None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 eos_ids: Optional[list[int]] = None, adapters=None, prefill_chunk: int = 512,
                 prefill_token_budget: int = 4096, prefix_cache_mib: float = 256.0):
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.eos_ids = list(eos_ids if eos_ids is not None else model.config.eos_token_ids)
        self.adapters = adapters  # a MultiLoRA (per-row adapters) or None
        self.runner = ModelRunner(model, max_batch, adapters, prefill_chunk,
                                  prefix_cache_for(model, prefix_cache_mib))
        self.context = self.runner.context
        self.max_batch = max_batch
        self.scheduler = Scheduler(max_batch, max_queue, prefill_token_budget)
        self.metrics = Metrics(self.runner.prefix_cache)
        self._stop = threading.Event()
        self._accepting = True
        self._thread: Optional[threading.Thread] = None
        self.heartbeat = time.monotonic()  # the loop's last turn: /health tells a stuck loop by it
        self.steps = 0

    # ---------------------------------------------------------------- client side

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len < 1:
            raise PromptTooLong("the prompt is empty: it needs at least one token")
        if prompt_len >= self.context:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens, over the context of {self.context} tokens "
                                f"by {prompt_len - self.context + 1}")
        if prompt_len + max_new_tokens > self.context:
            raise PromptTooLong(f"max_tokens {max_new_tokens} plus the prompt's {prompt_len} tokens exceed the "
                                f"context of {self.context} tokens by {prompt_len + max_new_tokens - self.context}")

    def validate(self, request: Request) -> None:
        """Everything that could fail once the request holds a slot, checked before it may take one."""
        request.config.validate()
        self.check_fits(len(request.prompt_ids), request.config.max_new_tokens)
        bad = [t for t in request.prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is not in the vocabulary (0..{self.vocab_size - 1})")
        if request.adapter is not None and (self.adapters is None or request.adapter not in self.adapters.names):
            raise ValueError(f"unknown adapter {request.adapter!r}")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be between 0 and 20, got {request.top_logprobs}")

    def submit(self, request: Request) -> Request:
        self.submit_group([request])
        return request

    def submit_group(self, requests: list[Request]) -> list[Request]:
        """Queue all of `requests` (one API call's choices and prompts) or none of them."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        for request in requests:
            self.validate(request)
        self.scheduler.add_group(requests)
        return requests

    def abort(self, request: Request) -> None:
        """The client went away: end the request at the next step, freeing its slot."""
        self.scheduler.abort(request.id)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="danlu-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Take no new requests; let the running ones finish for up to `drain_timeout` seconds, then abort what is
        left (each client gets its end) and stop the loop."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.alive and time.monotonic() < deadline and self.scheduler.load["running"] + \
                self.scheduler.load["waiting"]:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for request in self.scheduler.drain():
            self._end(request, "cancelled", release=False)

    @property
    def model(self):
        return self.runner.model

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> dict:
        return self.scheduler.load

    def health(self, stuck_after: float = 120.0) -> tuple[bool, dict]:
        """(healthy, details): unhealthy when the loop has died, or has not turned for `stuck_after` seconds
        while requests wait or run."""
        load = self.scheduler.load
        since = time.monotonic() - self.heartbeat
        busy = load["running"] or load["waiting"]
        problem = None
        if not self.alive:
            problem = "the engine loop is not running"
        elif busy and since > stuck_after:
            problem = f"the engine loop has not completed a step for {since:.0f} s"
        return problem is None, {**load, "seconds_since_last_step": round(since, 3),
                                 **({"problem": problem} if problem else {})}

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if not self.scheduler.wait_for_work(timeout=0.1):
                continue
            self.step()

    def step(self) -> None:
        """One turn: end the aborted, prefill the admitted, decode the rest."""
        schedule = self.scheduler.schedule()
        for request in schedule.aborted:
            self._end(request, "cancelled", release=False)
        try:
            if schedule.prefill:
                self._prefill(schedule.prefill)
            decoding = [r for r in schedule.decode if not r.ended]
            if decoding:
                self._decode(decoding)
        except Exception as e:  # a bug must not leave clients hanging: fail what is running, free the slots
            logger.exception("engine step failed")
            for request in self.scheduler.fail_running():
                self._end(request, "error", error=f"{type(e).__name__}: {e}", release=False)
        self.steps += 1

    def _prefill(self, requests: list[Request]) -> None:
        started = []
        for request in requests:
            try:
                request.state = SequenceState(request.prompt_ids, request.config, self.eos_ids, self.tokenizer,
                                              self.vocab_size, self.runner.device, request.ignore_eos,
                                              request.top_logprobs)
                started.append(request)
            except Exception as e:
                self._end(request, "error", error=f"{type(e).__name__}: {e}")
        if not started:
            return
        logits = self.runner.prefill([r.slot for r in started], [r.prompt_ids for r in started],
                                     [r.adapter for r in started])
        self.metrics.prompt_tokens(sum(len(r.prompt_ids) for r in started))
        for request, row in zip(started, logits):
            self._accept(request, row)

    def _decode(self, requests: list[Request]) -> None:
        started = time.monotonic()
        logits = self.runner.decode([r.slot for r in requests], [r.last_token for r in requests],
                                    [r.adapter for r in requests])
        self.metrics.decode_step(time.monotonic() - started, len(requests))
        for request, row in zip(requests, logits):
            self._accept(request, row)

    def _accept(self, request: Request, logits) -> None:
        choice = request.state.choose(logits)
        request.last_token = choice.token
        request.unreported.append(choice)
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
            self.metrics.first_token(request.first_token_at - request.submitted)
        piece, reason = request.state.accept(choice)
        if piece:
            self._emit(request, Event(text=piece, completion_tokens=len(request.generated),
                                      tokens=self._take_unreported(request)))
        if reason is not None:
            self._end(request, reason)

    def _end(self, request: Request, reason: str, error: Optional[str] = None, release: bool = True) -> None:
        """The one way a request ends: its held-back text, its slot back (unless the scheduler already took it),
        its last event."""
        if request.ended:
            return
        request.ended = True
        if reason in ("stop", "length") and request.state is not None:
            self.runner.remember(request.slot, request.prompt_ids + request.generated, request.adapter)
            tail = request.state.flush()
            if tail:
                self._emit(request, Event(text=tail, completion_tokens=len(request.generated)))
        if release:
            self.scheduler.finish(request)
        self.metrics.finished(reason, len(request.generated))
        self._emit(request, Event(finish_reason=reason, completion_tokens=len(request.generated), error=error,
                                  tokens=self._take_unreported(request)))

    @staticmethod
    def _take_unreported(request: Request) -> list[TokenChoice]:
        taken, request.unreported = request.unreported, []
        return taken

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # a client's callback must not stop the loop for everyone else
            logger.exception("delivering an event of request %s failed", request.id)
