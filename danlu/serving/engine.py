"""The continuous-batching engine: one thread decodes every running request together, one token a step.

Requests wait in a bounded queue; between steps new ones are prefilled into free slots and finished or
cancelled ones leave, so a request never waits for a whole batch to finish. Each request keeps its own
sampling settings, seed, stop strings and KV-cache slot.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from danlu.generation.sampling import GenerationConfig, next_tokens
from danlu.generation.text import IncrementalDecoder
from danlu.serving.slots import SlotKVCache
from danlu.utils.progress import logger


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: the client should retry later."""


class PromptTooLong(ValueError):
    """The prompt (plus the asked-for tokens) does not fit the context."""


@dataclass
class Event:
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error" on the last event
    completion_tokens: int = 0
    error: Optional[str] = None


@dataclass
class Request:
    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]  # called from the engine thread
    adapter: Optional[str] = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks), as vLLM's extension
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    # engine-side state
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    last_token: int = 0
    decoder: Optional[IncrementalDecoder] = None
    generator: Optional[torch.Generator] = None
    seen: Optional[torch.Tensor] = None
    max_new: int = 0

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 eos_ids: Optional[list[int]] = None, adapters=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.context = model.config.max_position_embeddings
        self.eos_ids = set(eos_ids if eos_ids is not None else model.config.eos_token_ids)
        self.adapters = adapters  # a MultiLoRA (per-row adapters) or None
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.device = device
        self.cache = SlotKVCache(model.config, max_batch, self.context, dtype, device)
        self.waiting: "queue.Queue[Request]" = queue.Queue(maxsize=max_queue)
        self.running: dict[int, Request] = {}
        self.free_slots = list(range(max_batch))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    # ---------------------------------------------------------------- client side

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len >= self.context:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens, over the context of {self.context} tokens "
                                f"by {prompt_len - self.context + 1}")
        if prompt_len + max_new_tokens > self.context:
            raise PromptTooLong(f"max_tokens {max_new_tokens} plus the prompt's {prompt_len} tokens exceed the "
                                f"context of {self.context} tokens by {prompt_len + max_new_tokens - self.context}")

    def submit(self, request: Request) -> Request:
        self.check_fits(len(request.prompt_ids), request.config.max_new_tokens)
        if self.adapters is not None and request.adapter is not None and request.adapter not in self.adapters.names:
            raise ValueError(f"unknown adapter {request.adapter!r}")
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self.waiting.maxsize} requests are already waiting") from None
        return request

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="danlu-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "waiting": self.waiting.qsize(), "slots": self.max_batch}

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.running:
                    try:
                        request = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._start(request)
                    continue
                self._step()
            except Exception as e:  # a bug must not leave clients hanging: fail what is running
                logger.exception("engine step failed")
                for request in list(self.running.values()):
                    self._finish(request, "error", error=f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        while self.free_slots and not self.waiting.empty():
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            self._start(request)

    @torch.inference_mode()
    def _start(self, request: Request) -> None:
        """Prefill a new request into a free slot and pick its first token."""
        if request.cancelled:
            request.emit(Event(finish_reason="cancelled"))
            return
        request.slot = self.free_slots.pop()
        self.cache.reset(request.slot)
        request.decoder = IncrementalDecoder(self.tokenizer, request.config.stop)
        request.max_new = request.config.max_new_tokens
        if request.config.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.config.seed)
        if request.config.repetition_penalty != 1.0:
            request.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            request.seen[request.prompt_ids] = True
        self.running[request.id] = request
        view = self.cache.view([request.slot])
        ids = torch.tensor([request.prompt_ids], device=self.device)
        self._set_adapters([request])
        logits = self.model(ids, position_ids=view.position_ids(len(request.prompt_ids)), kv_cache=view,
                            last_only=True)[:, -1]
        self._accept(request, logits[0])

    @torch.inference_mode()
    def _step(self) -> None:
        requests = [r for r in self.running.values()]
        for r in requests:
            if r.cancelled:
                self._finish(r, "cancelled")
        requests = [r for r in requests if not r.cancelled]
        if not requests:
            return
        view = self.cache.view([r.slot for r in requests])
        tokens = torch.tensor([[r.last_token] for r in requests], device=self.device)
        self._set_adapters(requests)
        logits = self.model(tokens, attention_mask=view.attention_mask(1), position_ids=view.position_ids(1),
                            kv_cache=view)[:, -1]
        self.steps += 1
        for request, row_logits in zip(requests, logits):
            self._accept(request, row_logits)

    def _set_adapters(self, requests: list[Request]) -> None:
        if self.adapters is not None:
            self.adapters.set_rows([r.adapter for r in requests])

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        token = int(next_tokens(logits[None], request.config, None if request.seen is None else request.seen[None],
                                request.generator)[0])
        request.generated.append(token)
        request.last_token = token
        if request.seen is not None:
            request.seen[token] = True
        if token in self.eos_ids and not request.ignore_eos:
            self._finish(request, "stop")
            return
        piece = request.decoder.add(token)
        if piece:
            request.emit(Event(text=piece, completion_tokens=len(request.generated)))
        if request.decoder.stopped:
            self._finish(request, "stop")
        elif len(request.generated) >= request.max_new:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, error: Optional[str] = None) -> None:
        if reason in ("stop", "length"):  # text held back as a possible stop string is final now
            tail = request.decoder.flush() if request.decoder else ""
            if tail:
                request.emit(Event(text=tail, completion_tokens=len(request.generated)))
        self.running.pop(request.id, None)
        if request.slot >= 0:
            self.free_slots.append(request.slot)
            request.slot = -1
        request.emit(Event(finish_reason=reason, completion_tokens=len(request.generated), error=error))
