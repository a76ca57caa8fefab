"""The OpenAI-compatible HTTP API over the engine: /v1/models, /v1/chat/completions, /v1/completions, with /health
and /metrics.

Requests and responses are pydantic models of OpenAI's schemas; errors are OpenAI's error object. What can be
wrong with a request is found before it takes a KV-cache slot (the engine validates it whole); the n choices and
the list of prompts of one call are one group, queued or refused together and aborted together when the client
goes away, streaming or not. Tokenization runs off the event loop.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from danlu.generation.sampling import MAX_SEED, GenerationConfig
from danlu.generation.sequence import TokenChoice
from danlu.serving.engine import Engine, Event, PromptTooLong, QueueFull, Request, ShuttingDown
from danlu.tokenization.chat import encode_chat, stop_words

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is refused (413) before it is read whole
DISCONNECT_POLL_SECONDS = 0.25


# ---------------------------------------------------------------- request schemas

def strict_text(value):
    """Text that is valid Unicode: a lone surrogate ("\\ud800" in JSON) cannot be encoded or tokenized."""
    for text in [value] if isinstance(value, str) else (value or []):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"not valid Unicode text ({e.reason} at character {e.start})") from None
    return value


class ChatMessage(BaseModel):
    role: str
    content: str
    _strict = field_validator("content")(strict_text)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=16)
    ignore_eos: bool = False  # vLLM's extension: keep going past EOS (for benchmarks)
    presence_penalty: float = 0.0  # accepted for compatibility; not applied
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    _strict = field_validator("stop")(strict_text)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)  # the legacy API's top-n count
    _strict_prompt = field_validator("prompt")(strict_text)


# ---------------------------------------------------------------- response schemas

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChoiceLogprobs] = None


class CompletionHeader(BaseModel):
    """What every completion body and chunk starts with."""
    id: str
    created: int
    model: str


class ChatCompletion(CompletionHeader):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[CompletionLogprobs] = None


class Completion(CompletionHeader):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(CompletionHeader):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunk(CompletionHeader):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "danlu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class ClientGone(Exception):
    """The client closed the connection: its generations were aborted."""


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


async def api_error(_, exc: APIError):
    return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)


async def validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return error_response(400, f"{where or 'body'}: {message}", param=where or None)


# ---------------------------------------------------------------- routes

router = APIRouter()


def service_of(http: HTTPRequest) -> "Service":
    return http.app.state.service


@router.get("/health")
async def health(http: HTTPRequest):
    healthy, details = service_of(http).engine.health()
    return JSONResponse(status_code=200 if healthy else 503, content={"status": "ok" if healthy else "unhealthy",
                                                                      **details})


@router.get("/metrics")
async def metrics(http: HTTPRequest):
    engine = service_of(http).engine
    return PlainTextResponse(engine.metrics.prometheus(engine.load), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=ModelList)
async def models(http: HTTPRequest):
    return service_of(http).models()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    return await service_of(http).chat_completion(body, http)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, http: HTTPRequest):
    return await service_of(http).completion(body, http)


def create_app(engine: Engine, model_name: str, template: Optional[str] = None, api_key: Optional[str] = None,
               default_max_tokens: int = 512, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app: the routes above over one Service, OpenAI's error shapes, the API key check and the body
    size limit."""
    app = FastAPI(title="danlu", version="0.1.0")
    app.state.service = Service(engine, model_name, template, default_max_tokens)
    app.include_router(router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


class BodySizeLimit:
    """413 for a body over `max_bytes`, told by its Content-Length or counted as it arrives (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(413, f"the request body is over the limit of {self.max_bytes} bytes",
                                   code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"the request body is over the limit of {self.max_bytes} bytes",
                               code="request_too_large")
            return message

        try:
            await self.app(scope, counted_receive, send)
        except APIError as e:  # raised while the body was read, before any response started
            await error_response(e.status, e.message, code=e.code)(scope, receive, send)


class APIKeyCheck:
    """/v1 routes need `Authorization: Bearer KEY`; compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                          "authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------- what the routes do

class Service:
    """Requests turned into engine generations, and OpenAI's response bodies."""

    def __init__(self, engine: Engine, model_name: str, template: Optional[str], default_max_tokens: int):
        self.engine, self.model_name, self.template = engine, model_name, template
        self.default_max_tokens = default_max_tokens
        self.tokenizer = engine.tokenizer
        self.template_stops = stop_words(self.tokenizer, template)
        self.adapter_names = list(engine.adapters.names) if engine.adapters is not None else []

    def models(self) -> ModelList:
        created = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=created) for name in [self.model_name, *self.adapter_names]])

    async def chat_completion(self, body: ChatCompletionRequest, http: HTTPRequest):
        adapter = self.resolve_adapter(body.model)
        prompt = await asyncio.to_thread(self.chat_prompt, body)
        config = self.generation_config(body, self.template_stops)
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        jobs = [(prompt, config.for_row(i)) for i in range(body.n)]
        if body.stream:
            return self.stream_response(body, jobs, adapter, http, chat=True, top=top, logprobs=body.logprobs)
        results = await self.run_group(jobs, adapter, http, body.ignore_eos, top)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.reason,
                              logprobs=self.chat_logprobs(r.tokens) if body.logprobs else None)
                   for i, r in enumerate(results)]
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                              choices=choices, usage=usage(len(prompt), sum(len(r.tokens) for r in results)))

    async def completion(self, body: CompletionRequest, http: HTTPRequest):
        adapter = self.resolve_adapter(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings", param="prompt")
        # A completion prompt is the client's own text, control tokens included (as OpenAI and vLLM take it).
        encoded = await asyncio.to_thread(lambda: [self.tokenizer(p, add_special_tokens=True)["input_ids"]
                                                   for p in prompts])
        if body.max_tokens is None and body.max_completion_tokens is None:
            body.max_tokens = 16  # OpenAI's default for completions
        config = self.generation_config(body, [])
        top = body.logprobs
        jobs = [(ids, config.for_row(i)) for ids in encoded for i in range(body.n)]
        if body.stream:
            if len(jobs) != 1:
                raise APIError(400, "streaming takes one prompt and n = 1", param="prompt")
            return self.stream_response(body, jobs, adapter, http, chat=False, top=top,
                                        logprobs=body.logprobs is not None)
        results = await self.run_group(jobs, adapter, http, body.ignore_eos, top)
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.reason,
                                    logprobs=self.completion_logprobs(r.tokens) if body.logprobs is not None
                                    else None) for i, r in enumerate(results)]
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=choices,
                          usage=usage(sum(len(ids) for ids in encoded), sum(len(r.tokens) for r in results)))

    def resolve_adapter(self, name: str) -> Optional[str]:
        if name == self.model_name:
            return None
        if name in self.adapter_names:
            return name
        raise APIError(404, f"the model {name!r} does not exist; served: {[self.model_name, *self.adapter_names]}",
                       param="model", code="model_not_found")

    def generation_config(self, body: SamplingFields, extra_stops: list[str]) -> GenerationConfig:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        try:
            return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                    stop=stops).with_stops(extra_stops)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        try:
            return encode_chat(self.tokenizer, [m.model_dump() for m in body.messages], self.template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    # ---- running a group of generations

    def submit(self, jobs, adapter: Optional[str], ignore_eos: bool, top: int, deliver) -> list[Request]:
        requests = [Request(ids, config, (lambda e, i=i: deliver(i, e)), adapter, ignore_eos, top)
                    for i, (ids, config) in enumerate(jobs)]
        try:
            return self.engine.submit_group(requests)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="server_busy") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        except PromptTooLong as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def open_group(self, jobs, adapter, ignore_eos: bool, top: int) -> tuple[list[Request], asyncio.Queue]:
        """Submit the group (an HTTP error if it cannot be queued); its events arrive on the queue as (index, event)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = self.submit(jobs, adapter, ignore_eos, top,
                               lambda i, e: loop.call_soon_threadsafe(queue.put_nowait, (i, e)))
        return requests, queue

    async def events(self, requests: list[Request], queue: asyncio.Queue, http: HTTPRequest):
        """Yield (index, event) until every member of the group has ended. A client that goes away ends the
        group: every member still running is aborted (its slot freed at the next step)."""
        open_members, checked = len(requests), 0.0  # the first check at once, then every poll interval
        try:
            while open_members:
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    index, event = None, None
                if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        raise ClientGone()
                if event is None:
                    continue
                open_members -= event.finish_reason is not None
                yield index, event
        finally:
            for request in requests:
                self.engine.abort(request)

    async def run_group(self, jobs, adapter, http, ignore_eos: bool, top: int) -> list["Result"]:
        results = [Result() for _ in jobs]
        requests, queue = self.open_group(jobs, adapter, ignore_eos, top)
        try:
            async for index, event in self.events(requests, queue, http):
                results[index].add(event)
        except ClientGone:
            raise APIError(499, "the client closed the connection", code="client_closed") from None
        for result in results:
            if result.reason == "error":
                raise APIError(500, f"generation failed: {result.error}", "server_error")
        return results

    # ---- log-probabilities in OpenAI's two shapes

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_logprobs(self, tokens: list[TokenChoice]) -> ChoiceLogprobs:
        def entry(token, logprob):
            text = self.token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        return ChoiceLogprobs(content=[TokenLogprob(**entry(c.token, c.logprob).model_dump(),
                                                    top_logprobs=[entry(t, lp) for t, lp in c.top])
                                       for c in tokens])

    def completion_logprobs(self, tokens: list[TokenChoice]) -> CompletionLogprobs:
        texts = [self.token_text(c.token) for c in tokens]
        offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        top = [{self.token_text(t): lp for t, lp in c.top} for c in tokens]
        return CompletionLogprobs(tokens=texts, token_logprobs=[c.logprob for c in tokens],
                                  top_logprobs=top if any(c.top for c in tokens) else None, text_offset=offsets)

    # ---- streaming

    def stream_response(self, body, jobs, adapter, http, chat: bool, top: int, logprobs: bool) -> StreamingResponse:
        if len(jobs) != 1:
            raise APIError(400, "stream with n > 1 is not supported", param="n")
        prompt = jobs[0][0]
        chunks = StreamChunks(body.model, chat)
        # Submitted now, so a full queue or a bad request is an HTTP error, not an event in a 200 stream.
        requests, queue = self.open_group(jobs, adapter, body.ignore_eos, top)

        async def events():
            if chat:
                yield chunks.chat(DeltaMessage(role="assistant", content=""))
            tokens = 0
            try:
                async for _, event in self.events(requests, queue, http):
                    tokens = event.completion_tokens or tokens
                    lp = (self.chat_logprobs(event.tokens) if chat else self.completion_logprobs(event.tokens)) \
                        if logprobs and event.tokens else None
                    if event.text or lp:
                        yield chunks.chat(DeltaMessage(content=event.text), logprobs=lp) if chat else \
                            chunks.text(event.text, logprobs=lp)
                    if event.finish_reason:
                        reason = "length" if event.finish_reason == "length" else "stop"
                        yield chunks.chat(DeltaMessage(), reason) if chat else chunks.text("", reason)
            except ClientGone:
                return
            if body.stream_options and body.stream_options.include_usage:
                yield chunks.usage(usage(len(prompt), tokens))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Result:
    """One member of a group, collected."""

    def __init__(self):
        self.pieces: list[str] = []
        self.tokens: list[TokenChoice] = []
        self.reason, self.error = "stop", None

    def add(self, event: Event) -> None:
        self.pieces.append(event.text)
        self.tokens.extend(event.tokens)
        if event.finish_reason:
            self.reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason
            self.error = event.error

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class StreamChunks:
    """The server-sent events of one streamed completion (chat deltas or text pieces), one id and time for all."""

    def __init__(self, model: str, chat: bool):
        self.model, self.is_chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chat(self, delta: DeltaMessage, finish: Optional[str] = None, logprobs=None) -> str:
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=logprobs)]))

    def text(self, text: str, finish: Optional[str] = None, logprobs=None) -> str:
        return sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            CompletionChoice(index=0, text=text, finish_reason=finish, logprobs=logprobs)]))

    def usage(self, counts: Usage) -> str:
        kind = ChatCompletionChunk if self.is_chat else CompletionChunk
        return sse(kind(id=self.id, created=self.created, model=self.model, choices=[], usage=counts))


def sse(chunk: BaseModel) -> str:
    return f"data: {json.dumps(chunk.model_dump(exclude_none=False), ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
