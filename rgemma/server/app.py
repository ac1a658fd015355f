"""The HTTP layer: OpenAI's chat and text completion endpoints over one Worker.

It receives the engine (no module globals), turns request bodies into jobs,
and the worker's updates into OpenAI responses or server-sent events. Every
error is OpenAI's error object, `{"error": {"message", "type", "param",
"code"}}`, the message naming the field.

Log-probabilities are those of the model's distribution after the repetition,
presence and frequency penalties, before temperature and the top-k/top-p/min-p
filters (rgemma/sampling.py says why); `top_logprobs` are the most likely
tokens of that distribution.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import json
import math
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from rgemma.engine import Engine, Event
from rgemma.sampling import SamplingParams
from rgemma.server.metrics import Metrics
from rgemma.server.prefix_cache import PrefixCache
from rgemma.server.schema import ChatRequest, CompletionRequest, ErrorBody, Sampling
from rgemma.server.worker import Done, Failed, Job, Started, Token, Worker
from rgemma.tokenizer import chat_turns

DISCONNECT_POLL_SECONDS = 0.5
MIN_LOGPROB = -9999.0  # JSON has no -inf
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}
# What the published OpenAPI schema says each endpoint may answer.
ERRORS = {status: {"model": ErrorBody, "description": description} for status, description in [
    (400, "a body, field or value the server does not accept (the message names it)"),
    (401, "a missing or wrong API key"),
    (404, "a model that is not served here"),
    (413, "a body larger than the server reads"),
    (503, "the model is warming up or the queue is full (see Retry-After)"),
]}
COMPLETION = {200: {"description": "the completion, or with stream: true server-sent events ending in [DONE]",
                    "content": {"application/json": {}, "text/event-stream": {}}}} | ERRORS


@dataclasses.dataclass(frozen=True)
class Settings:
    model_name: str = "rgemma"
    api_key: str | None = None  # None: no authentication
    max_batch: int = 64
    max_queue: int = 256  # jobs without a first token; more get 503
    max_prompt_tokens: int = 32768
    max_tokens: int = 4096  # the most a choice may generate, and the default
    max_body_bytes: int = 1 << 20
    cache_bytes: int = 1 << 30  # the prefix cache's bound; 0 turns it off


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BodyLimit:
    """ASGI middleware: reads a request's body first, answering 413 once it passes `limit` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                error = APIError(413, f"the request body is larger than {self.limit} bytes", code="body_too_large")
                return await error.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:  # after the body, what the client does next (http.disconnect)
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


class RequestCounter:
    """ASGI middleware: counts answered requests by path and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def create_app(engine: Engine, settings: Settings = Settings()) -> FastAPI:
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer")
    tokenizer = engine.tokenizer
    metrics = Metrics()
    worker = Worker(engine, PrefixCache(settings.cache_bytes), metrics, settings.max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="rgemma", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions from a RecurrentGemma / Griffin model")
    app.state.worker = worker
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None,
                        headers=getattr(error, "headers", None)).response()

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def openapi() -> dict:
        """FastAPI's schema, less the 422 answers it documents for validation: this server answers 400."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health", responses={503: {"description": "the model is warming up"},
                                   500: {"description": "the model failed its warm-up step"}})
    async def health():
        if worker.failure:
            return JSONResponse({"status": "failed", "reason": worker.failure}, status_code=500)
        ready = worker.ready.is_set()
        return JSONResponse({"status": "ready" if ready else "warming up"}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus metrics in its text format"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses={401: ERRORS[401]})
    async def models():
        return {"object": "list",
                "data": [{"id": settings.model_name, "object": "model", "created": created, "owned_by": "rgemma"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], responses=COMPLETION)
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        try:
            pieces = chat_turns(tokenizer, messages)
        except ValueError as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        prompt, breaks = join_pieces(pieces[:-1])
        prompt += pieces[-1]

        def follow_up(reply: str) -> tuple[list[int], list[int]]:
            return join_pieces(chat_turns(tokenizer, messages + [{"role": "assistant", "content": reply}], False))

        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = make_job(body, prompt, "messages", max_tokens, top, breaks=breaks, follow_up=follow_up)
        reply = ChatReply(body, tokenizer, engine.end_tokens, logprobs=body.logprobs)
        return await respond(request, body, job, reply)

    @app.post("/v1/completions", dependencies=[Depends(authorize)], responses=COMPLETION)
    async def completions(body: CompletionRequest, request: Request):
        prompt = tokenizer.encode(body.prompt, bos=True) if isinstance(body.prompt, str) else list(body.prompt)
        job = make_job(body, prompt, "prompt", body.max_tokens or 16, body.logprobs or 0)
        reply = TextReply(body, tokenizer, engine.end_tokens, logprobs=body.logprobs is not None)
        return await respond(request, body, job, reply)

    def make_job(body: Sampling, prompt: list[int], field: str, max_tokens: int | None, top_logprobs: int,
                 **options) -> Job:
        if body.model != settings.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                           f"{settings.model_name!r}", param="model", code="model_not_found")
        max_tokens = settings.max_tokens if max_tokens is None else max_tokens
        if max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens: at most {settings.max_tokens} here, got {max_tokens}", param="max_tokens")
        if len(prompt) > settings.max_prompt_tokens:
            raise APIError(400, f"{field}: {len(prompt)} tokens, more than the {settings.max_prompt_tokens} "
                           "this server reads", param=field, code="context_length_exceeded")
        vocab = engine.model.config.vocab_size
        outside = next((t for t in prompt if t >= vocab), None)
        if outside is not None:
            raise APIError(400, f"{field}: token {outside} is outside the vocabulary of {vocab}", param=field)
        sampling = [
            SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                           repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                           frequency_penalty=body.frequency_penalty,
                           seed=None if body.seed is None else body.seed + choice, logprobs=top_logprobs)
            for choice in range(body.n)
        ]
        return Job(prompt, sampling, max_tokens, body.stops, ignore_eos=body.ignore_eos, **options)

    async def respond(request: Request, body: Sampling, job: Job, reply: Reply):
        if not worker.ready.is_set():
            raise APIError(503, "the model is warming up; try again shortly", kind="server_error",
                           code="warming_up", headers={"Retry-After": "1"})
        reply.prompt_tokens = len(job.prompt)
        updates: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.send = lambda update: loop.call_soon_threadsafe(updates.put_nowait, update)
        if not worker.submit(job):
            raise APIError(503, f"the queue is full ({settings.max_queue} requests waiting); try again shortly",
                           kind="server_error", code="queue_full", headers={"Retry-After": "1"})
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(job, updates, reply, usage), media_type="text/event-stream")
        try:
            next_check = loop.time() + DISCONNECT_POLL_SECONDS
            while True:
                # Checked on a clock, not only when no token came: tokens may arrive faster than the poll.
                if loop.time() >= next_check:
                    if await request.is_disconnected():
                        worker.cancel(job)
                        return Response(status_code=499)
                    next_check = loop.time() + DISCONNECT_POLL_SECONDS
                try:
                    update = await asyncio.wait_for(updates.get(), max(0.0, next_check - loop.time()))
                except TimeoutError:
                    continue
                if isinstance(update, Failed):
                    raise APIError(500, update.message, kind="server_error")
                reply.add(update)
                if isinstance(update, Done):
                    return reply.response()
        except asyncio.CancelledError:
            worker.cancel(job)
            raise

    async def stream(job: Job, updates: asyncio.Queue, reply: Reply, include_usage: bool):
        finished = False
        try:
            while True:
                update = await updates.get()
                if isinstance(update, Failed):
                    error = {"error": {"message": update.message, "type": "server_error", "param": None, "code": None}}
                    yield sse(error)
                    finished = True
                    return
                for choice in reply.add(update):
                    yield sse(reply.chunk([choice], include_usage))
                if isinstance(update, Done):
                    finished = True
                    if include_usage:
                        yield sse(reply.chunk([], include_usage) | {"usage": reply.usage()})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away: free its slots now
                worker.cancel(job)

    return app


def join_pieces(pieces: list[list[int]]) -> tuple[list[int], list[int]]:
    """The ids of pieces one after another, and where each turn ends (not the lone bos)."""
    ends = list(itertools.accumulate(len(piece) for piece in pieces))
    return [token for piece in pieces for token in piece], ends[1:]


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"


def validation_error(error: RequestValidationError) -> APIError:
    """pydantic's first complaint, as a message that names the field."""
    first = error.errors()[0]
    # Field names and list indices; not "body", nor the tags pydantic gives the members of a union.
    location = [str(part) for part in first.get("loc", ())
                if isinstance(part, int) or (part != "body" and part.isidentifier() and part not in UNION_TAGS)]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first.get("type") == "missing" and not location:
        return APIError(400, "the request needs a JSON body")
    if not location:
        return APIError(400, "the body must be a JSON object with the request's fields, "
                        "sent as Content-Type: application/json")
    return APIError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param=param)


class Reply:
    """Gathers a job's updates into choices; the endpoint's subclass writes them OpenAI's way."""

    object_name = ""

    def __init__(self, body: Sampling, tokenizer, end_tokens: set[int], logprobs: bool):
        self.body = body
        self.tokenizer = tokenizer
        self.end_tokens = end_tokens
        self.logprobs = logprobs
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [[] for _ in range(body.n)]
        self.entries = [[] for _ in range(body.n)]  # per choice, per token: (token, logprob, top)
        self.finish_reasons: list[str | None] = [None] * body.n
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def add(self, update) -> list[dict]:
        """Take an update; the choices it changes, as stream chunks."""
        if isinstance(update, Started):
            self.cached_tokens = update.cached_tokens
            return self.opening()
        if not isinstance(update, Token):
            return []
        event: Event = update.event
        self.completion_tokens += 1
        self.texts[update.choice].append(event.text)
        entry = None
        # The token that ended a choice is not part of its text, nor of its log-probabilities.
        if self.logprobs and not (event.finish_reason == "stop" and event.token in self.end_tokens):
            entry = (event.token, event.logprob, event.top_logprobs)
            self.entries[update.choice].append(entry)
        self.finish_reasons[update.choice] = event.finish_reason
        if not (event.text or entry or event.finish_reason):
            return []
        return [self.delta(update.choice, event.text, entry, event.finish_reason)]

    def token_text(self, token: int) -> tuple[str, list[int]]:
        data = self.tokenizer.token_bytes(token)
        return data.decode("utf-8", errors="replace"), list(data)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def chunk(self, choices: list[dict], include_usage: bool) -> dict:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.body.model,
                 "choices": choices}
        return chunk | ({"usage": None} if include_usage else {})

    def response(self) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.body.model,
                "choices": [self.choice(i) for i in range(self.body.n)], "usage": self.usage()}


def logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if not math.isnan(value) else MIN_LOGPROB


class ChatReply(Reply):
    prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.body.n)]

    def entry(self, token: int, value: float, top: list[tuple[int, float]]) -> dict:
        text, data = self.token_text(token)
        alternatives = []
        for other, other_value in top:
            other_text, other_data = self.token_text(other)
            alternatives.append({"token": other_text, "logprob": logprob(other_value), "bytes": other_data})
        return {"token": text, "logprob": logprob(value), "bytes": data, "top_logprobs": alternatives}

    def delta(self, choice: int, text: str, entry, finish_reason) -> dict:
        logprobs = None if entry is None else {"content": [self.entry(*entry)]}
        return {"index": choice, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def choice(self, i: int) -> dict:
        logprobs = {"content": [self.entry(*e) for e in self.entries[i]]} if self.logprobs else None
        return {"index": i, "message": {"role": "assistant", "content": "".join(self.texts[i])},
                "logprobs": logprobs, "finish_reason": self.finish_reasons[i]}


class TextReply(Reply):
    prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def opening(self) -> list[dict]:
        return []

    def logprobs_of(self, entries, offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for token, value, top in entries:
            text = self.token_text(token)[0]
            tokens.append(text)
            values.append(logprob(value))
            tops.append({self.token_text(other)[0]: logprob(v) for other, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def delta(self, choice: int, text: str, entry, finish_reason) -> dict:
        offset = sum(len(t) for t in self.texts[choice]) - len(text)
        logprobs = None if entry is None else self.logprobs_of([entry], offset)
        return {"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def choice(self, i: int) -> dict:
        logprobs = self.logprobs_of(self.entries[i], 0) if self.logprobs else None
        return {"index": i, "text": "".join(self.texts[i]), "logprobs": logprobs,
                "finish_reason": self.finish_reasons[i]}
