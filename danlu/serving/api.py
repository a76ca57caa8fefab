"""The OpenAI-compatible HTTP API over the engine: /v1/models, /v1/chat/completions, /v1/completions."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from danlu.generation.sampling import GenerationConfig
from danlu.serving.engine import Engine, Event, PromptTooLong, QueueFull, Request
from danlu.tokenization.chat import encode_chat, stop_words


class ChatMessage(BaseModel):
    role: str
    content: str


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
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=16)
    ignore_eos: bool = False  # vLLM's extension: keep going past EOS (for benchmarks)
    presence_penalty: float = 0.0  # accepted for compatibility; not applied
    frequency_penalty: float = 0.0
    user: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def create_app(engine: Engine, model_name: str, template: Optional[str] = None, api_key: Optional[str] = None,
               default_max_tokens: int = 512) -> FastAPI:
    """The FastAPI app: OpenAI's error shapes, the API key check, and the routes, each handed to a Service."""
    app = FastAPI(title="danlu", version="0.1.0")
    service = Service(engine, model_name, template, default_max_tokens)
    add_error_handlers(app)
    if api_key:
        add_api_key_check(app, api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        return await service.chat_completion(body, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await service.completion(body, http)

    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)


def add_api_key_check(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def _authenticate(request: HTTPRequest, call_next):
        if request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                      "authentication_error", code="invalid_api_key")
        return await call_next(request)


class Service:
    """What the routes do: requests turned into engine generations and OpenAI's response bodies."""

    def __init__(self, engine: Engine, model_name: str, template: Optional[str], default_max_tokens: int):
        self.engine, self.model_name, self.template = engine, model_name, template
        self.default_max_tokens = default_max_tokens
        self.tokenizer = engine.tokenizer
        self.template_stops = stop_words(self.tokenizer, template)
        self.adapter_names = list(engine.adapters.names) if engine.adapters is not None else []

    def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "danlu"}
                                           for name in [self.model_name, *self.adapter_names]]}

    async def chat_completion(self, body: ChatCompletionRequest, http: HTTPRequest):
        adapter = self.resolve_adapter(body.model)
        prompt = self.chat_prompt(body)
        config = self.generation_config(body, self.template_stops)
        self.engine_check(prompt, config)
        if body.stream:
            return self.stream_response(body, prompt, config, adapter, http, chat=True)
        results = await asyncio.gather(*[self.collect(prompt, seeded(config, i), adapter, http, body.ignore_eos)
                                         for i in range(body.n)])
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                    "logprobs": None} for i, (text, reason, _) in enumerate(results)]
        return completion_body("chatcmpl", "chat.completion", body.model, choices, len(prompt),
                               sum(t for _, _, t in results))

    async def completion(self, body: CompletionRequest, http: HTTPRequest):
        adapter = self.resolve_adapter(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings", param="prompt")
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        if body.max_tokens is None and body.max_completion_tokens is None:
            body.max_tokens = 16  # OpenAI's default for completions
        config = self.generation_config(body, [])
        for ids in encoded:
            self.engine_check(ids, config)
        if body.stream:
            if len(encoded) != 1:
                raise APIError(400, "streaming takes one prompt", param="prompt")
            return self.stream_response(body, encoded[0], config, adapter, http, chat=False)
        jobs = [self.collect(ids, seeded(config, i), adapter, http, body.ignore_eos)
                for ids in encoded for i in range(body.n)]
        results = await asyncio.gather(*jobs)
        choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                   for i, (text, reason, _) in enumerate(results)]
        return completion_body("cmpl", "text_completion", body.model, choices,
                               sum(len(ids) for ids in encoded), sum(t for _, _, t in results))

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
        return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                stop=stops).with_stops(extra_stops)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        try:
            return encode_chat(self.tokenizer, [m.model_dump() for m in body.messages], self.template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def engine_check(self, prompt: list[int], config: GenerationConfig) -> None:
        try:
            self.engine.check_fits(len(prompt), config.max_new_tokens)
        except PromptTooLong as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None

    async def run(self, prompt_ids: list[int], config: GenerationConfig, adapter: Optional[str], http: HTTPRequest,
                  ignore_eos: bool = False):
        """Submit one generation; yield its events as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = Request(prompt_ids, config, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), adapter,
                          ignore_eos)
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="server_busy") from None
        except PromptTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()  # a client gone mid-way frees its slot at the next step

    async def collect(self, prompt_ids, config, adapter, http, ignore_eos=False) -> tuple[str, str, int]:
        text, reason, tokens = [], "stop", 0
        async for event in self.run(prompt_ids, config, adapter, http, ignore_eos):
            text.append(event.text)
            tokens = event.completion_tokens or tokens
            if event.finish_reason:
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                reason = event.finish_reason
        return "".join(text), reason, tokens

    def stream_response(self, body, prompt, config, adapter, http, chat: bool) -> StreamingResponse:
        if body.n != 1:
            raise APIError(400, "stream with n > 1 is not supported", param="n")
        chunk = StreamChunks(body.model, chat)

        async def events():
            if chat:
                yield chunk(None, None, role=True)
            tokens = 0
            async for event in self.run(prompt, config, adapter, http, body.ignore_eos):
                tokens = event.completion_tokens or tokens
                if event.text:
                    yield chunk(event.text, None)
                if event.finish_reason:
                    reason = "stop" if event.finish_reason in ("stop", "cancelled") else event.finish_reason
                    yield chunk(None, "length" if reason == "length" else "stop")
            if body.stream_options and body.stream_options.include_usage:
                yield chunk(None, None, usage={"prompt_tokens": len(prompt), "completion_tokens": tokens,
                                               "total_tokens": len(prompt) + tokens})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class StreamChunks:
    """The server-sent events of one streamed completion (chat deltas or text pieces), one id and time for all."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = "chat.completion.chunk" if chat else "text_completion"

    def __call__(self, delta_text: Optional[str], finish: Optional[str], role: bool = False, usage=None) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}]
        payload = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                   "choices": [] if usage else choices}
        if usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def seeded(config: GenerationConfig, index: int) -> GenerationConfig:
    """The i-th of n choices: a different seed each, so n > 1 gives n samples."""
    if index == 0 or config.seed is None:
        return config
    return config.updated(seed=config.seed + index)


def completion_body(prefix: str, kind: str, model: str, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}
