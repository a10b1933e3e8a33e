"""The OpenAI-compatible HTTP API (the /v1 subset below) over an engine (engine.py).

    GET  /v1/models             the one served model
    POST /v1/completions        prompt -> text (prompt may be a list: one choice per prompt)
    POST /v1/chat/completions   ChatML messages -> the assistant's reply
    GET  /health                alive and ready (model loaded, decode step compiled): 200, else 503
    GET  /metrics               Prometheus metrics (metrics.py)
    GET  /stats                 the engine's counters (not part of the OpenAI API)

`stream: true` answers with server-sent events `data: {json}` ending in `data: [DONE]`. Every
invalid request gets a 400 with `{"error": {"message", "type", "param", "code"}}`; a body over
`max_body_bytes` a 413 as soon as that many bytes have come (or at once from Content-Length); a
full queue a 429 with Retry-After; a request past its deadline a 504 (or an error event, once
streaming); with `api_key`, a request without `Authorization: Bearer <key>` a 401 (/health
stays open). Bodies are parsed, validated and tokenized in a thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mptkit.data.templates import format_chatml
from mptkit.inference.prompts import stop_token_ids
from mptkit.inference.sampling import SamplingParams

from mptkit.inference.text import FINISH_CANCELLED

from .defaults import DEFAULT_MAX_BODY_BYTES
from .engine import DEADLINE_EXCEEDED, Draining, Event, Job, QueueFull
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    validation_message,
)

DISCONNECT_POLL_S = 0.25
TOKENIZER_THREADS = 2
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers' probes)
_STATUS_OUTCOMES = {401: "unauthorized", 413: "too_large", 429: "rejected", 503: "unavailable", 504: "timeout"}


class GenerationFailed(RuntimeError):
    """The engine could not generate (a server fault, not the request's)."""


class _Expired(RequestError):
    """A request past its deadline (its outcome is counted where it is raised)."""


def create_app(engine, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_timeout: float | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The app over a started `Engine` or `StaticEngine`."""
    metrics = metrics or ServerMetrics()
    metrics.watch(engine)
    engine.observer = metrics
    workers = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="mptkit-tokenize")
    tokenizers = _ThreadTokenizers(engine.tokenizer)
    vocab_size = engine.decoder.config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mptkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, error: RequestError):
        if not isinstance(error, _Expired):
            metrics.outcome(_STATUS_OUTCOMES.get(error.status, "invalid"))
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException):
        metrics.outcome("invalid")
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(error_body(str(error.detail), code=code), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, error: Exception):
        if not isinstance(error, GenerationFailed):  # counted where it was raised
            metrics.outcome("error")
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", type_="server_error"), 500)

    @app.get("/v1/models")
    async def list_models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "mptkit"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        ready = engine.ready.is_set() and not engine.draining
        status = "draining" if engine.draining else "ok" if ready else "starting"
        body = {"status": status, "alive": True, "ready": ready, "model_loaded": True, "compiled": engine.compiled,
                "warmup_seconds": round(engine.warmup_seconds, 3)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/stats")
    async def stats():
        return engine.stats_dict()

    async def prepare(function, request: Request) -> "_Prepared":
        raw = await request.body()
        loop = asyncio.get_running_loop()
        # the lambda runs in the worker thread, so it takes that thread's tokenizer
        return await loop.run_in_executor(
            workers, lambda: function(raw, tokenizers.get(), vocab_size, engine.context_length))

    def submit(prepared: "_Prepared") -> list[Job]:
        loop = asyncio.get_running_loop()
        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        jobs = [Job(p, prepared.params, prepared.stops, loop, deadline) for p in prepared.prompts]
        try:
            return engine.submit(jobs)
        except QueueFull as e:
            raise RequestError(f"The server is busy ({e}); retry later.", code="queue_full", status=429,
                               type_="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining:
            raise RequestError("The server is shutting down.", code="shutting_down", status=503,
                               type_="server_unavailable") from None

    async def answer(request: Request, chat: bool):
        prepared = await prepare(_prepare_chat if chat else _prepare_completion, request)
        prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        reply = _Reply(prefix, kind, model_name, prepared.body, submit(prepared), metrics)
        if prepared.body.stream:
            return _sse(reply.chat_chunks(request) if chat else reply.completion_chunks(request))
        return await (reply.chat(request) if chat else reply.completion(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


class _ThreadTokenizers:
    """A copy of the tokenizer per thread: a fast tokenizer may not be used from two threads at
    once (the engine thread detokenizes with the original)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.local = threading.local()
        self.lock = threading.Lock()

    def get(self):
        """The calling thread's copy."""
        if not hasattr(self.local, "tokenizer"):
            with self.lock:
                self.local.tokenizer = copy.deepcopy(self.tokenizer)
        return self.local.tokenizer


class _Guard:
    """ASGI middleware: the API key, and the body-size limit enforced while the body streams in."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                self.metrics.outcome("unauthorized")
                message = "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'."
                return await _send_json(send, 401, error_body(message, code="invalid_api_key"),
                                        [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.outcome("too_large")
            return await _send_json(send, 413, self._too_large().body(), [(b"connection", b"close")])
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()  # answered by the app's RequestError handler
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> RequestError:
        return RequestError(f"The request body is larger than this server's limit of {self.limit} bytes.",
                            code="request_too_large", status=413)


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
    content = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": content})


@dataclass
class _Prepared:
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    params: SamplingParams
    stops: frozenset[int]


def _prepare_completion(raw: bytes, tokenizer, vocab_size: int, context: int) -> _Prepared:
    body = _parse(CompletionRequest, raw)
    prompts = _completion_prompts(body.prompt, tokenizer, vocab_size)
    max_new = _max_new_tokens(body.max_tokens, max(len(p) for p in prompts), context, "max_tokens")
    return _Prepared(body, prompts, _sampling_params(body, max_new), stop_token_ids(tokenizer, "none"))


def _prepare_chat(raw: bytes, tokenizer, vocab_size: int, context: int) -> _Prepared:
    body = _parse(ChatCompletionRequest, raw)
    messages = [{"role": _chatml_role(m.role), "content": m.text()} for m in body.messages]
    prompt = tokenizer(format_chatml(messages, add_generation_prompt=True))["input_ids"]
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise RequestError("Give max_tokens or max_completion_tokens, not both.", "max_completion_tokens")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = _max_new_tokens(requested, len(prompt), context, param, messages=True)
    return _Prepared(body, [prompt], _sampling_params(body, max_new), stop_token_ids(tokenizer, "chat"))


# ---- request checks ----------------------------------------------------------------------------


def _parse(model, raw: bytes):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(
            "We could not parse the JSON body of your request. The body must be a JSON object.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise RequestError(message, param) from None
    unsupported = body.unsupported()
    if unsupported is not None:
        raise RequestError(f"{unsupported}={getattr(body, unsupported)!r} is not supported by this server.",
                           unsupported, "unsupported_parameter")
    return body


def _completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise RequestError("prompt must not be empty.", "prompt")
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
    for token_ids in ids:
        if not token_ids:
            raise RequestError("prompt must not be empty.", "prompt")
        if any(t < 0 or t >= vocab_size for t in token_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab_size}).", "prompt")
    return ids


def _max_new_tokens(requested: int | None, prompt_length: int, context: int, param: str, messages: bool = False) -> int:
    where = "messages" if messages else "prompt"
    if prompt_length >= context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, your {where} resulted in "
            f"{prompt_length} tokens, leaving no room for a completion.",
            where,
            "context_length_exceeded",
        )
    if requested is None:
        return context - prompt_length
    if prompt_length + requested > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_length + requested} tokens ({prompt_length} in the {where}, {requested} in the "
            "completion). Please reduce the length of the prompt or the completion.",
            param,
            "context_length_exceeded",
        )
    return requested


def _sampling_params(body, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(body.temperature if body.temperature is not None else 1.0),  # OpenAI's default
        top_p=float(body.top_p if body.top_p is not None else 1.0),
        top_k=body.top_k or 0,
        repetition_penalty=float(body.repetition_penalty or 1.0),
        stop=body.stop_strings(),
        seed=body.seed,
    )


def _chatml_role(role: str) -> str:
    return "system" if role == "developer" else role


# ---- responses ---------------------------------------------------------------------------------


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except GenerationFailed as e:  # generation failed after the 200 was sent: say so in the stream
            yield f"data: {json.dumps(error_body(str(e), type_='server_error'))}\n\n"
        except RequestError as e:  # past its deadline after the 200 was sent
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Reply:
    """Collects the events of a request's jobs into OpenAI responses or stream chunks."""

    def __init__(self, prefix: str, kind: str, model_name: str, body, jobs: list[Job], metrics: ServerMetrics):
        self.metrics = metrics
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind
        self.model = model_name
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.jobs = jobs

    def _cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(j.prompt_ids) for j in self.jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    async def _events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) for all jobs as they come; stops the jobs if the client leaves."""
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(index: int, job: Job):
            while True:
                event = await job.events.get()
                await merged.put((index, event))
                if event.finish_reason is not None or event.error is not None:
                    return

        tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(self.jobs)]
        remaining = len(self.jobs)
        checked = time.monotonic()
        outcome, cut_off = None, False  # None: the client left
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(merged.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    index, event = None, None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event.error_code == DEADLINE_EXCEEDED:
                    outcome = "timeout"
                    raise _Expired(f"The request ran past this server's deadline; {event.completion_tokens} tokens "
                                   "were generated.", code=DEADLINE_EXCEEDED, status=504, type_="timeout_error")
                if event.error is not None:
                    outcome = "error"
                    raise GenerationFailed(event.error)
                if event.finish_reason is not None:
                    remaining -= 1
                    cut_off |= event.finish_reason == FINISH_CANCELLED  # by the server, shutting down
                yield index, event
            outcome = "cancelled" if cut_off else "ok"
        finally:
            self.metrics.outcome(outcome or "cancelled")
            self._cancel()  # a no-op for finished jobs; stops the others (client gone, or an error)
            for task in tasks:
                task.cancel()

    async def _collect(self, request: Request) -> tuple[list[list[str]], list[str | None], int]:
        texts: list[list[str]] = [[] for _ in self.jobs]
        finish: list[str | None] = [None] * len(self.jobs)
        tokens = 0
        async for index, event in self._events(request):
            texts[index].append(event.text)
            if event.finish_reason is not None:
                finish[index] = event.finish_reason
                tokens += event.completion_tokens
        return texts, finish, tokens

    async def completion(self, request: Request) -> dict:
        texts, finish, tokens = await self._collect(request)
        choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
        return self._envelope(self.kind, choices, usage=self._usage(tokens))

    async def chat(self, request: Request) -> dict:
        texts, finish, tokens = await self._collect(request)
        message = {"role": "assistant", "content": "".join(texts[0])}
        choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish[0]}]
        return self._envelope(self.kind, choices, usage=self._usage(tokens))

    async def completion_chunks(self, request: Request) -> AsyncIterator[dict]:
        tokens = 0
        async for index, event in self._events(request):
            tokens += event.completion_tokens if event.finish_reason else 0
            choice = {"index": index, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
            yield self._envelope(self.kind, [choice])
        if self.include_usage:
            yield self._envelope(self.kind, [], usage=self._usage(tokens))

    async def chat_chunks(self, request: Request) -> AsyncIterator[dict]:
        kind = "chat.completion.chunk"
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield self._envelope(kind, [first])
        tokens = 0
        async for _, event in self._events(request):
            delta = {"content": event.text} if event.text else {}
            if event.finish_reason:
                tokens = event.completion_tokens
            yield self._envelope(kind, [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": event.finish_reason}])
        if self.include_usage:
            yield self._envelope(kind, [], usage=self._usage(tokens))
