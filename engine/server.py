"""The OpenAI-compatible HTTP server: FastAPI routes over `AsyncLLM` (`nexus-tune serve`).

Routes: `/v1/completions`, `/v1/chat/completions` (SSE streaming or one JSON body),
`/v1/models`, `/health`, `/metrics` (Prometheus text). Every bad request gets an OpenAI-style
error body `{"error": {"message", "type", "param", "code"}}`; a parameter we do not support is
a 400 that names it, never silently ignored. Admission is bounded: at most `max_queue` accepted
requests may wait for their first token; beyond that a 503 with Retry-After, so memory stays
bounded under any load. A client that goes away aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nexus_tune.sequence import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_AFTER_S = 1  # what a 503 tells the client to wait; the queue drains at step speed
# A 128k-token prompt is about 1 MB as text or as token ids; a larger body is refused before it is read.
MAX_BODY_BYTES = 16 * 2**20
# The request fields that map one-to-one onto SamplingParams; unset ones keep the engine's defaults.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


# -- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    # extra="forbid": an unsupported parameter (logprobs, echo, tools, ...) is a 400 naming it.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's convention)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch.Generator takes
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # Batched prompts (a list of strings or of id lists) are OpenAI-legal but not supported.
        ok_ids = isinstance(v, list) and all(type(t) is int and t >= 0 for t in v)
        if not (isinstance(v, str) or ok_ids):
            raise ValueError("expected one prompt: a string or a list of non-negative token ids")
        return v


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens


# -- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An expected failure, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class RequestFailed(Exception):
    """The engine failed this one request; the server and the other requests go on."""


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 details -> one OpenAI-style 400 that names the offending parameter(s)."""
    errors = exc.errors()
    unknown = [_param(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return APIError(400, f"unsupported parameter(s): {', '.join(unknown)}",
                        param=unknown[0], code="unsupported_parameter")
    if errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    # The deepest location is the most precise: a union (e.g. content: str | list of parts)
    # reports every member it tried, and the member that got furthest names the real problem.
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if not param:
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    message = first["msg"].removeprefix("Value error, ")
    if param == "n" and first["type"] == "literal_error":
        message = "only n=1 is supported"
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _param(loc: tuple) -> str:
    """("body", "messages", 0, "str", "role") -> "messages.0.role".

    pydantic puts the union member it tried (a type such as "str" or "list[int]") inside the
    location; no field of ours has such a name, so those parts are dropped.
    """
    return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and (p in ("str", "int") or "[" in p)))


# -- metrics -------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus metrics: latency histograms observed here, engine gauges read at scrape time."""

    def __init__(self, engine: Any, server: OpenAIServer) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("nexus_time_to_first_token_seconds", "Time to first token.",
                              buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                       1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0),
                              registry=self.registry)
        self.itl = Histogram("nexus_inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
                             buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                                      0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0),
                             registry=self.registry)
        self.e2e = Histogram("nexus_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0,
                                      480.0, 960.0, 1920.0),
                             registry=self.registry)
        self.finished = Counter("nexus_requests", "Finished requests by finish reason.",
                                ["finished_reason"], registry=self.registry)
        self.rejected = Counter("nexus_requests_rejected", "Requests answered 503 (queue full).",
                                registry=self.registry)
        self.prompt_tokens = Counter("nexus_prompt_tokens", "Prompt tokens of accepted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("nexus_generation_tokens", "Generated tokens.", registry=self.registry)
        self.registry.register(_EngineCollector(engine, server))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads `engine.stats()` when /metrics is scraped, so the gauges are never stale."""

    # stats() key -> (metric name, help); a key the engine does not report (or reports as None) is left out.
    GAUGES = {
        "running": ("nexus_num_requests_running", "Requests in the running batch."),
        "waiting": ("nexus_num_requests_waiting", "Requests the engine has queued for prefill."),
        "kv_usage": ("nexus_kv_cache_usage_perc", "Share of KV blocks in use (0 to 1)."),
        "free_blocks": ("nexus_kv_free_blocks", "Free KV cache blocks."),
        "prefill_sms": ("nexus_prefill_sms", "SMs of the current split given to prefill."),
    }
    COUNTERS = {
        "split_switches": ("nexus_split_switches", "Changes of the prefill/decode split."),
        "num_preemptions": ("nexus_num_preemptions", "Sequences preempted (KV dropped, recomputed later)."),
    }

    def __init__(self, engine: Any, server: OpenAIServer) -> None:
        self.engine, self.server = engine, server

    def describe(self) -> list:
        return []  # collected lazily; nothing to check at registration time

    def collect(self):
        stats = self.engine.stats()
        for key, (name, doc) in self.GAUGES.items():
            if stats.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, (name, doc) in self.COUNTERS.items():
            if stats.get(key) is not None:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        yield GaugeMetricFamily("nexus_server_pending_requests",
                                "Accepted requests without a first token yet (bounded by --max-queue).",
                                value=float(len(self.server.waiting)))


# -- the server ----------------------------------------------------------------------------
class OpenAIServer:
    """The request logic behind the routes: validation, admission, streaming, accounting."""

    def __init__(self, engine: Any, model_name: str, max_queue: int) -> None:
        self.engine, self.model_name, self.max_queue = engine, model_name, max_queue
        self.waiting: set[str] = set()  # admitted, no token yet: what --max-queue bounds (event loop only)
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine, self)

    # -- validation ----------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(400, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def prompt_ids(self, body: CompletionRequest | ChatRequest) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(body, ChatRequest):
            try:
                ids = tok.apply_chat_template([m.as_template_input() for m in body.messages], tokenize=True)
            except jinja2.TemplateError as exc:  # a template's raise_exception, e.g. roles out of order
                raise APIError(400, f"messages: {exc}", param="messages", code="invalid_value") from exc
        elif isinstance(body.prompt, str):
            ids = tok.encode(body.prompt)
        else:
            ids = body.prompt
            vocab = tok.vocab_size
            if any(t >= vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be below the vocabulary size {vocab}",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty", param=_prompt_param(body), code="invalid_value")
        return ids

    def sampling_params(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> SamplingParams:
        limit = self.engine.max_model_len
        param = _prompt_param(body)
        if prompt_len >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                           f"{prompt_len}, which leaves no room for output", param=param,
                           code="context_length_exceeded")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; you asked for "
                           f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        fields = {k: getattr(body, k) for k in SAMPLING_FIELDS if getattr(body, k) is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **fields)
        except ValueError as exc:  # what the body's types let through, e.g. an empty stop string
            raise APIError(400, str(exc), code="invalid_value") from exc

    def admit(self, request_id: str) -> None:
        if len(self.waiting) >= self.max_queue:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is overloaded: {len(self.waiting)} requests already wait; "
                           "retry later", type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting.add(request_id)

    def release(self, request_id: str) -> None:
        """The request stops counting against --max-queue (first token, end, or client gone). Idempotent."""
        self.waiting.discard(request_id)

    # -- generation ----------------------------------------------------------------------
    async def tokens(self, request_id: str, ids: list[int], params: SamplingParams) -> AsyncIterator[Any]:
        """The engine's token stream with accounting; leaving early (client gone) aborts the request."""
        start = last = time.perf_counter()
        first, finished = True, False
        self.metrics.prompt_tokens.inc(len(ids))
        try:
            async with contextlib.aclosing(self.engine.generate(request_id, ids, params)) as stream:
                async for out in stream:
                    finished = out.finished
                    if out.token_id is None:  # an error, or the engine shutting down: an end without a token
                        self.metrics.finished.labels(out.finish_reason).inc()
                        raise RequestFailed(out.error or f"the request ended early ({out.finish_reason})")
                    now = time.perf_counter()
                    if first:
                        self.release(request_id)
                        first = False
                        self.metrics.ttft.observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    self.metrics.generation_tokens.inc()
                    if finished:
                        self.metrics.e2e.observe(now - start)
                        self.metrics.finished.labels(out.finish_reason).inc()
                    yield out
        except RequestFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - one request's fault must not take the server down
            finished = True
            log.exception("request %s failed inside the engine", request_id)
            self.metrics.finished.labels("error").inc()
            raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.release(request_id)
            if not finished:
                self.engine.abort(request_id)
                self.metrics.finished.labels("abort").inc()

    async def complete(self, request: Request, body: CompletionRequest | ChatRequest) -> Response:
        self.check_model(body.model)
        ids = self.prompt_ids(body)
        params = self.sampling_params(body, len(ids))
        chat = isinstance(body, ChatRequest)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.admit(request_id)
        tokens = self.tokens(request_id, ids, params)
        shape = _Shape(request_id, self.model_name, chat, len(ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(self.sse(shape, tokens, include_usage), on_close=lambda: self.release(request_id))
        try:
            text, count, reason = await _cancel_on_disconnect(request, _collect(tokens))
        except RequestFailed as exc:
            return _engine_error(exc).response()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request was aborted
        finally:
            self.release(request_id)  # also when `tokens` never started
        return JSONResponse(shape.full(text, reason, count))

    async def sse(self, shape: _Shape, tokens: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
        count = 0
        # aclosing: if Starlette stops this stream (client gone), `tokens` closes at once and aborts.
        async with contextlib.aclosing(tokens):
            if shape.chat:
                yield _event(shape.chunk(None, None, role=True))
            try:
                async for out in tokens:
                    count += 1
                    yield _event(shape.chunk(out.text, out.finish_reason if out.finished else None))
            except RequestFailed as exc:
                yield _event(_engine_error(exc).body())
        if include_usage:
            yield _event(shape.usage_chunk(count))
        yield "data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


async def _collect(tokens: AsyncIterator[Any]) -> tuple[str, int, str | None]:
    parts, reason = [], None
    async with contextlib.aclosing(tokens):
        async for out in tokens:
            parts.append(out.text)
            reason = out.finish_reason
    return "".join(parts), len(parts), reason


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets an OpenAI-style 413, never buffered whole.

    An announced Content-Length is checked up front (the HTTP server holds the body to it); a
    chunked body is read here up to the limit, then handed on.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        pending = iter(messages)

        async def replay() -> dict:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        error = APIError(413, f"the request body is over {self.max_bytes} bytes", code="body_too_large")
        await error.response()(scope, receive, send)


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it (which aborts the request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op when it is done
        await asyncio.wait({task})  # let the cancelled work run its clean-up (the abort) first
    if task.cancelled():
        raise ClientGone
    return task.result()


class _EventStream(StreamingResponse):
    """An SSE response that closes its stream and calls `on_close` however it ends.

    Starlette leaves a stream it stopped (client gone) to the garbage collector, and never
    starts one whose client left before the first byte: closing here aborts the engine
    request at once and releases its queue slot in both cases.
    """

    def __init__(self, stream: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.on_close()


class _Shape:
    """The OpenAI response shapes of one request (completion or chat; full body or stream chunk)."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_tokens: int) -> None:
        self.id, self.model, self.chat, self.prompt_tokens = request_id, model, chat, prompt_tokens
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def full(self, text: str, finish_reason: str | None, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion_tokens)}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _engine_error(exc: RequestFailed) -> APIError:
    return APIError(500, f"the request failed inside the engine: {exc}", type="internal_server_error")


def _prompt_param(body: CompletionRequest | ChatRequest) -> str:
    return "messages" if isinstance(body, ChatRequest) else "prompt"


# -- the app -------------------------------------------------------------------------------
def build_app(engine: Any, model_name: str, max_queue: int = 1024) -> FastAPI:
    """The FastAPI app over an engine that follows AsyncLLM's contract (docs/architecture.md).

    The app starts the engine's loops on start-up and stops them on shutdown.
    """
    server = OpenAIServer(engine, model_name, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="nexus-tune", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.complete(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await server.complete(request, body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "nexus-tune",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        # A loop thread that died takes the engine with it: say so, so a supervisor restarts us.
        failed = engine.stats().get("failed")
        if failed:
            return JSONResponse({"status": "failed", "error": failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def run_serve(args: argparse.Namespace) -> int:
    """`nexus-tune serve`: load the model, then serve until interrupted."""
    import uvicorn

    from engine.llm import AsyncLLM, EngineError

    if args.max_queue < 1:
        print(f"error: --max-queue must be at least 1 (got {args.max_queue})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncLLM(args.model, policy=args.policy, device=args.device, profile=args.profile,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = build_app(engine, args.served_model_name or args.model, args.max_queue)
    # No access log: one line per request costs the event loop time that streaming needs.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
