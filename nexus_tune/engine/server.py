"""The OpenAI-compatible HTTP server: FastAPI routes over `AsyncLLM` (`nexus-tune serve`).

Routes: `/v1/completions`, `/v1/chat/completions` (SSE streaming or one JSON body),
`/v1/models`, `/v1/models/{id}`, `/health`, `/metrics` (Prometheus text). Every parameter the
official `openai` client sends for these two routes is accepted, and implemented where it changes
the output (penalties, logprobs, n, echo, seed, stop); what the engine cannot do is a 400 that
names the parameter, never silently ignored. Every error, whatever the input (bytes that are not
UTF-8, JSON nested 100k deep, a wrong method), has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, and no input makes a 5xx.

Admission is bounded: at most `max_queue` accepted requests may wait for their first token;
beyond that a 503 with Retry-After, so memory stays bounded under any load. A client that goes
away aborts its request, which frees its KV blocks. Shutdown (`serve`) drains for at most
`shutdown_timeout` seconds, then ends every open response with an error (an error event and
`[DONE]` on a stream); the engine always shuts down.
"""
from __future__ import annotations
import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, Literal, TypeVar
import anyio
import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException
from nexus_tune.core.sequence import MAX_LOGPROBS, MAX_REPETITION_PENALTY, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_AFTER_S = 1  # what a 503 tells the client to wait; the queue drains at step speed
# A 128k-token prompt is about 1 MB as text or as token ids; a larger body is refused before it is read.
MAX_BODY_BYTES = 16 * 2**20
MAX_CHOICES = 128  # OpenAI's limit on n
SHUTDOWN_TIMEOUT_S = 30.0  # how long a shutdown lets open requests finish before it aborts them
ABORT_GRACE_S = 5.0  # after the aborts, how long open responses get to write their error
_POLL_S = 0.05
# The request fields that map one-to-one onto SamplingParams; unset ones keep the engine's defaults.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
                   "presence_penalty", "frequency_penalty", "repetition_penalty")
# A JSON escape of a UTF-16 surrogate: the only way a body can hold a str that has no UTF-8 form.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# -- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    # extra="forbid": an unsupported parameter (tools, logit_bias, ...) is a 400 naming it.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI's API reads null as "not given", and some clients send every field.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, lt=2**31)  # -1 or 0: off (vLLM's convention)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch.Generator takes
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)  # vLLM's extension
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; it changes nothing here
    # Subclasses define logprob_count() (alternatives per token; None: no logprobs) and
    # refuse_unsupported() (a 400 naming a value the types allow but the engine cannot serve).


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # Batched prompts (a list of strings or of id lists) are OpenAI-legal but not supported.
        ok_ids = isinstance(v, list) and all(type(t) is int and t >= 0 for t in v)
        if not (isinstance(v, str) or ok_ids):
            raise ValueError("expected one prompt: a string or a list of non-negative token ids")
        return v

    def logprob_count(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise APIError(400, "suffix is not supported (this server does no fill-in-the-middle)",
                           param="suffix", code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (the engine computes no prompt logprobs)",
                           param="echo", code="unsupported_parameter")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # `developer` is OpenAI's newer name for `system`; chat templates know only the latter.
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema carries its schema; refused anyway
    type: str


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    response_format: ResponseFormat | None = None

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"response_format {self.response_format.type!r} is not supported; only 'text'",
                           param="response_format", code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")


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
    """This one request could not finish; `error` is what its client gets. The server goes on."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors -> one OpenAI-style 400 that names the offending parameter(s)."""
    errors = exc.errors()
    unknown = [_param(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return APIError(400, f"unsupported parameter(s): {', '.join(unknown)}",
                        param=unknown[0], code="unsupported_parameter")
    # The deepest location is the most precise: a union (e.g. content: str | list of parts)
    # reports every member it tried, and the member that got furthest names the real problem.
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if not param:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _param(loc: tuple) -> str:
    """("messages", 0, "str", "role") -> "messages.0.role".

    pydantic puts the union member it tried (a type such as "str" or "list[int]") inside the
    location; no field of ours has such a name, so those parts are dropped.
    """
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in ("str", "int") or "[" in p)))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _strings(value: Any) -> Iterator[str]:
    """Every str inside parsed JSON, keys included; iterative, so no depth can overflow the stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v


def _decode_json(raw: bytes) -> Any:
    """The body as JSON, or an APIError that says what is wrong with it."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    # A lone surrogate has no UTF-8 form: tokenizing or answering with it would fail later, as a 500.
    if _SURROGATE_ESCAPE.search(raw):
        for s in _strings(data):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(400, "the request body holds an unpaired UTF-16 surrogate escape",
                               code="invalid_json") from exc
    return data


B = TypeVar("B", bound=BaseModel)


async def read_body(request: Request, model: type[B]) -> B:
    """Parse and validate a JSON request body; every failure is an APIError (never FastAPI's own shape)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), not {content_type!r}",
                       code="unsupported_media_type")
    data = _decode_json(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _engine_error(message: str) -> APIError:
    return APIError(500, f"the request failed inside the engine: {message}", type="internal_server_error")


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
        "total_blocks": ("nexus_kv_total_blocks", "KV cache blocks in all."),
        "prefill_sms": ("nexus_prefill_sms", "SMs of the current split given to prefill."),
        # nexus: the controller's last decision explained (Controller.explain)
        "predicted_prefill_ms": ("nexus_predicted_prefill_step_ms", "Predicted prefill step at the current split."),
        "predicted_decode_ms": ("nexus_predicted_decode_step_ms", "Predicted decode step at the current split."),
        "tbt_allowance_ms": ("nexus_tbt_allowance_ms", "Decode step time the controller allows (slo mode)."),
        "recent_decode_ms": ("nexus_observed_decode_step_ms", "Recent mean decode step cycle, as measured."),
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
    """The request logic behind the routes: validation, admission, streaming, accounting, draining."""

    def __init__(self, engine: Any, model_name: str, max_queue: int,
                 shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        self.engine, self.model_name, self.max_queue = engine, model_name, max_queue
        self.shutdown_timeout = shutdown_timeout
        self.waiting: set[str] = set()  # admitted, no token yet: what --max-queue bounds (event loop only)
        self.open: set[str] = set()  # engine requests whose response is not finished (a superset of waiting)
        self.closing = False  # shutting down: new requests get a 503
        self.aborting = False  # the drain time is over: requests still open end with an error
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

    def max_tokens(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> int:
        """The request's max_tokens, checked against the context and the KV cache; by default all that fits."""
        context, limit = self.engine.max_model_len, self.engine.max_request_tokens
        where = (f"this server's KV cache holds at most {limit} tokens of one request (the model's context: "
                 f"{context})" if limit < context else f"this model's maximum context length is {context} tokens")
        if prompt_len >= limit:
            raise APIError(400, f"{where}; the prompt has {prompt_len}, which leaves no room for output",
                           param=_prompt_param(body), code="context_length_exceeded")
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        asked = getattr(body, param)
        if asked is None:
            return limit - prompt_len
        if prompt_len + asked > limit:
            raise APIError(400, f"{where}; you asked for {prompt_len + asked} ({prompt_len} in the prompt, "
                           f"{asked} to generate)", param=param, code="context_length_exceeded")
        return asked

    def sampling_params(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> list[SamplingParams]:
        """One SamplingParams per choice; with a seed, choice i uses seed + i so that choices differ."""
        fields = {k: getattr(body, k) for k in SAMPLING_FIELDS if getattr(body, k) is not None}
        try:
            params = SamplingParams(max_tokens=self.max_tokens(body, prompt_len), logprobs=body.logprob_count(),
                                    **fields)
        except ValueError as exc:  # what the body's types let through, e.g. an empty stop string
            raise APIError(400, str(exc), code="invalid_value") from exc
        if params.seed is None:
            return [params] * body.n
        return [replace(params, seed=params.seed + i) for i in range(body.n)]

    def admit(self, request_ids: list[str]) -> None:
        if self.closing:
            raise _shutting_down()
        if len(request_ids) > self.max_queue:  # it would wait forever: no amount of retrying helps
            raise APIError(400, f"n={len(request_ids)} is more than this server queues at once ({self.max_queue})",
                           param="n", code="invalid_value")
        if len(self.waiting) + len(request_ids) > self.max_queue:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is overloaded: {len(self.waiting)} requests already wait; "
                           "retry later", type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting.update(request_ids)
        self.open.update(request_ids)

    def release(self, request_id: str) -> None:
        """The request stops counting against --max-queue (first token, end, or client gone). Idempotent."""
        self.waiting.discard(request_id)

    def close(self, request_ids: list[str]) -> None:
        """The response is over: its requests count nowhere any more. Idempotent."""
        self.waiting.difference_update(request_ids)
        self.open.difference_update(request_ids)

    # -- generation ----------------------------------------------------------------------
    async def tokens(self, request_id: str, ids: list[int], params: SamplingParams) -> AsyncIterator[Any]:
        """The engine's token stream with accounting; leaving early (client gone) aborts the request."""
        if self.aborting:  # admitted, but the drain ended before it reached the engine
            raise RequestFailed(_shutting_down())
        start = last = time.perf_counter()
        first, finished = True, False
        self.metrics.prompt_tokens.inc(len(ids))
        try:
            async with contextlib.aclosing(self.engine.generate(request_id, ids, params)) as stream:
                async for out in stream:
                    finished = out.finished
                    if out.token_id is None:  # an error, or an abort (shutdown): an end without a token
                        self.metrics.finished.labels(out.finish_reason).inc()
                        raise RequestFailed(_shutting_down() if out.finish_reason == "abort"
                                            else _engine_error(out.error or "it ended early"))
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
        except ValueError as exc:  # the engine refused the request (AsyncLLM's contract): the client's fault
            finished = True
            self.metrics.finished.labels("error").inc()
            raise RequestFailed(APIError(400, str(exc), code="invalid_value")) from exc
        except Exception as exc:  # noqa: BLE001 - one request's fault must not take the server down
            finished = True
            log.exception("request %s failed inside the engine", request_id)
            self.metrics.finished.labels("error").inc()
            raise RequestFailed(_engine_error(f"{type(exc).__name__}: {exc}")) from exc
        finally:
            self.release(request_id)
            if not finished:
                self.engine.abort(request_id)
                self.metrics.finished.labels("abort").inc()

    async def complete(self, request: Request, body: CompletionRequest | ChatRequest) -> Response:
        self.check_model(body.model)
        body.refuse_unsupported()
        ids = self.prompt_ids(body)
        params = self.sampling_params(body, len(ids))
        chat = isinstance(body, ChatRequest)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(response_id, self.model_name, chat, len(ids), body.n, self._echo(body),
                       self.engine.tokenizer if params[0].logprobs is not None else None)
        request_ids = [f"{response_id}-{i}" for i in range(body.n)]
        self.admit(request_ids)
        choices = _merge([self.tokens(r, ids, p) for r, p in zip(request_ids, params)])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(shape.events(choices, include_usage), on_close=lambda: self.close(request_ids))
        try:
            outputs = await _cancel_on_disconnect(request, _collect(choices, body.n))
        except RequestFailed as exc:
            return exc.error.response()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request was aborted
        finally:
            self.close(request_ids)  # also when `choices` never started
        return JSONResponse(shape.full(outputs))

    def _echo(self, body: CompletionRequest | ChatRequest) -> str:
        """The prompt text an `echo` completion starts with ("" without echo)."""
        if not getattr(body, "echo", False):
            return ""
        return body.prompt if isinstance(body.prompt, str) else self.engine.tokenizer.decode(body.prompt)

    # -- shutdown ------------------------------------------------------------------------
    async def drain(self, force: Callable[[], bool] = lambda: False) -> None:
        """Refuse new requests (503); let open ones finish for up to `shutdown_timeout` seconds, or
        until `force()` (a second signal); then abort the rest, each ending with an error (an error
        event and [DONE] on a stream), and give them up to ABORT_GRACE_S to write it."""
        self.closing = True
        deadline = time.monotonic() + self.shutdown_timeout
        while self.open and time.monotonic() < deadline and not force():
            await asyncio.sleep(_POLL_S)
        if not self.open:
            return
        log.warning("shutting down: aborting %d requests still running", len(self.open))
        self.aborting = True
        for request_id in list(self.open):
            self.engine.abort(request_id)
        deadline = time.monotonic() + ABORT_GRACE_S
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


_END = object()


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, item) from several streams as the items come. The first exception ends the
    merge; closing it closes every stream (which aborts their requests)."""
    if len(streams) == 1:  # n=1, nearly every request: no task and no queue hop per token
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            queue.put_nowait((index, None, exc))
        else:
            queue.put_nowait((index, _END, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(choices: AsyncIterator[tuple[int, Any]], n: int) -> list[list[Any]]:
    """Every choice's outputs, by choice index."""
    outputs: list[list[Any]] = [[] for _ in range(n)]
    async with contextlib.aclosing(choices):
        async for index, out in choices:
            outputs[index].append(out)
    return outputs


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


def _finite(logprob: float) -> float:
    """-inf (a token of probability 0) or NaN as -9999.0, as vLLM does: JSON has neither."""
    return logprob if logprob >= -9999.0 else -9999.0


class _Logprobs:
    """A choice's TokenLogprobs in OpenAI's form: chat's `content` list, or the completions API's
    four lists, whose text offsets count on across the calls of one choice."""

    def __init__(self, tokenizer: Any, chat: bool, offset: int) -> None:
        self.tokenizer, self.chat, self.offset = tokenizer, chat, offset

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def format(self, outs: list[Any]) -> dict[str, Any]:
        if self.chat:
            return {"content": [{**self._entry(o.token_id, o.logprobs.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in o.logprobs.top]} for o in outs]}
        tokens = [self._text(o.token_id) for o in outs]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        # The sampled token is always listed, so a dict holds up to logprobs + 1 entries (OpenAI's rule).
        top = [{self._text(t): _finite(lp) for t, lp in [*o.logprobs.top, (o.token_id, o.logprobs.logprob)]}
               for o in outs]
        return {"tokens": tokens, "token_logprobs": [_finite(o.logprobs.logprob) for o in outs],
                "top_logprobs": top, "text_offset": offsets}


class _Shape:
    """The OpenAI response shapes of one request (completion or chat; full body or stream events)."""

    def __init__(self, response_id: str, model: str, chat: bool, prompt_tokens: int, n: int, echo: str,
                 logprob_tokenizer: Any | None) -> None:
        self.id, self.model, self.chat, self.prompt_tokens = response_id, model, chat, prompt_tokens
        self.n, self.echo = n, echo
        self.created = int(time.time())
        # With logprobs asked for (a tokenizer to name the tokens given): one formatter per choice.
        self.logprobs = ([_Logprobs(logprob_tokenizer, chat, len(echo)) for _ in range(n)]
                         if logprob_tokenizer else None)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _logprobs(self, index: int, outs: list[Any]) -> dict[str, Any] | None:
        return self.logprobs[index].format(outs) if self.logprobs else None

    def full(self, outputs: list[list[Any]]) -> dict[str, Any]:
        choices = []
        for index, outs in enumerate(outputs):
            text = "".join(o.text for o in outs)
            choice = {"index": index, "logprobs": self._logprobs(index, outs), "finish_reason": outs[-1].finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = self.echo + text
            choices.append(choice)
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": self.usage(sum(map(len, outputs)))}

    def chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None,
              role: bool = False) -> dict[str, Any]:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            if role:
                choice["delta"] = {"role": "assistant", "content": ""}
            else:
                choice["delta"] = {"content": text} if text or finish_reason is None else {}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = text
        return {**self._head("text_completion"), "choices": [choice]}

    async def events(self, choices: AsyncIterator[tuple[int, Any]], include_usage: bool) -> AsyncIterator[str]:
        """The SSE stream: per choice a role chunk (chat) or the echoed prompt, then one chunk per token;
        an error event if the request fails; the usage chunk if asked; then [DONE]."""
        count = 0
        # aclosing: if Starlette stops this stream (client gone), `choices` closes at once and aborts.
        async with contextlib.aclosing(choices):
            for index in range(self.n):
                if self.chat:
                    yield _event(self.chunk(index, "", role=True))
                elif self.echo:
                    yield _event(self.chunk(index, self.echo))
            try:
                async for index, out in choices:
                    count += 1
                    yield _event(self.chunk(index, out.text, out.finish_reason if out.finished else None,
                                            self._logprobs(index, [out])))
            except RequestFailed as exc:
                yield _event(exc.error.body())
        if include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            yield _event({**self._head(obj), "choices": [], "usage": self.usage(count)})
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    # ASCII-escaped: text holding U+0085, U+2028 or U+2029 would end the line for clients that
    # split lines as str.splitlines does (SSE itself ends lines only at CR and LF).
    return f"data: {json.dumps(payload)}\n\n"


def _prompt_param(body: CompletionRequest | ChatRequest) -> str:
    return "messages" if isinstance(body, ChatRequest) else "prompt"


# -- the app -------------------------------------------------------------------------------
def build_app(engine: Any, model_name: str, max_queue: int = 1024,
              shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> FastAPI:
    """The FastAPI app over an engine that follows AsyncLLM's contract (docs/architecture.md).

    The app starts the engine's loops on start-up; on shutdown it drains (at most
    `shutdown_timeout` seconds, see OpenAIServer.drain) and shuts the engine down.
    """
    server = OpenAIServer(engine, model_name, max_queue, shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            try:
                await server.drain()  # nothing left to drain when `serve` did it before closing connections
            finally:
                engine.shutdown()

    app = FastAPI(title="nexus-tune", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own: an unknown route (404) or a wrong method (405).
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never the client's fault; Starlette logs the traceback after this answer.
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}",
                        type="internal_server_error").response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.complete(request, await read_body(request, CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.complete(request, await read_body(request, ChatRequest))

    def card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "nexus-tune",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"the model `{model_id}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")
        return card()

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


class DrainingServer(uvicorn.Server):
    """uvicorn with a bounded drain. On the first SIGINT/SIGTERM the listening socket closes and
    OpenAIServer.drain runs while open responses are still served; a second SIGINT (uvicorn's
    forced exit) cuts the drain short, and its aborts still send every stream an error event and
    [DONE]. Then uvicorn's own shutdown, which finds nothing left to wait for; the engine shuts
    down in any case (uvicorn skips the app's lifespan shutdown on a forced exit)."""

    def __init__(self, config: uvicorn.Config, api: OpenAIServer) -> None:
        super().__init__(config)
        self.api = api

    async def shutdown(self, sockets: list | None = None) -> None:
        for listener in self.servers:
            listener.close()  # no new connections while draining
        try:
            await self.api.drain(force=lambda: self.force_exit)
            await super().shutdown(sockets)
        finally:
            self.api.engine.shutdown()  # idempotent (AsyncLLM's contract)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` (from build_app) until SIGINT/SIGTERM, then shut down gracefully (DrainingServer)."""
    # No access log: one line per request costs the event loop time that streaming needs.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    DrainingServer(config, app.state.server).run()
