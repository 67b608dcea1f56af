"""The engine's front door: `LLM` (offline `generate`, vLLM-style) and `AsyncLLM` (what the server drives).

    llm = LLM(model="tiny", policy="chunked", device="cpu")
    outs = llm.generate(["hello"], SamplingParams(max_tokens=8))     # -> list[RequestOutput]

    engine = AsyncLLM("llama-3.1-8b", policy="nexus"); engine.start()
    async for out in engine.generate(request_id, prompt_token_ids, params): ...   # TokenOutput per token
    engine.abort(request_id); engine.stats(); engine.shutdown()

`EngineCore` builds what both share: the SM splits (pre-created before the KV cache is sized),
the model runner, the scheduler with its controller, the decode CUDA graphs of every (split,
batch bucket) the policy can use, and the loop threads (nexus_tune/engine/loops.py). Tokens leave the loop
threads through `OutputProcessor`: incremental detokenization, stop checks, per-request records,
and one hand-off per step (`loop.call_soon_threadsafe` for asyncio consumers).

`nexus` needs the profile of this GPU and model (profiles/<gpu-slug>/<model-slug>.json unless
one is given) and refuses, naming the command that makes it, when there is none.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nexus_tune.engine.loader import resolve_config
from nexus_tune.engine.loops import LoopContext, Placement, StepLog, StepRecord, make_loops
from nexus_tune.engine.model_runner import ModelRunner, resolve_device
from nexus_tune.engine.sampling import TokenLogprobs, check_stop
from nexus_tune.core.block_manager import BlockManager
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.metrics import RequestRecord, parse_slos
from nexus_tune.core.overhead import StepTimes
from nexus_tune.core.partition import GREEN_CONTEXTS, TIME_SHARING, SplitTable
from nexus_tune.core.profile import Profile, ProfileError, find_profile
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.scheduler import Scheduler, parse_policy
from nexus_tune.core.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)

# A CPU has no SMs: under time-sharing the two-loop policies reason with the H100's count. The
# numbers are labels there (every split runs on the same streams), so static:64 reads the same.
NOMINAL_SMS = 132


class EngineError(RuntimeError):
    """The engine cannot start (or run) as configured; the message says why and what to do."""


@dataclass
class TokenOutput:
    """One new token of a request, as `AsyncLLM.generate` streams it."""

    request_id: str
    token_id: int | None  # None on an error output
    text: str  # the detokenized delta ("" while an incomplete character or a possible stop string waits)
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    metrics: RequestRecord | None = None  # on the last output
    logprobs: TokenLogprobs | None = None  # when the request's params ask for logprobs


@dataclass
class RequestOutput:
    """A whole request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestRecord
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the params ask for logprobs


Route = Callable[[list[TokenOutput]], None]  # receives a step's outputs, on a loop thread


# -- outputs -----------------------------------------------------------------------------------

class Detokenizer:
    """Text deltas of a growing id list. A delta waits while the decoded tail is an incomplete
    UTF-8 character (U+FFFD); a few prompt tokens of context give the first word its spacing."""

    CONTEXT = 5

    def __init__(self, tokenizer: Any, prompt_ids: Seq[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # ids[prefix:read] were decoded already; they anchor the next decode
        self.read = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> int:
        """Append a token; returns how many characters `text` grew by."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return 0
        new = after[len(before):]
        self.text += new
        self.ids, self.prefix, self.read = self.ids[self.read:], 0, len(self.ids) - self.read
        return len(new)

    def flush(self) -> None:
        """At the end: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(done):]
        self.prefix = self.read = len(self.ids)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    route: Route
    record: RequestRecord
    detok: Detokenizer
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of detok.text already streamed

    @property
    def holdback(self) -> int:
        """Characters kept back while they could still begin a stop string (never streamed, then cut)."""
        return max(map(len, self.params.stop)) - 1 if self.params.stop else 0


class OutputProcessor:
    """Tokens from the loop threads -> text deltas, stop decisions, records, and hand-offs.

    Implements engine.loops.OutputSink. Outputs wait in a per-thread outbox until the loop
    flushes it after finishing its step in the scheduler, so a consumer that sees `finished`
    also sees the request's blocks released.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.stop_token_ids)
        self._requests: dict[str, _Request] = {}
        self._local = threading.local()

    def register(self, request_id: str, prompt_ids: list[int], params: SamplingParams, route: Route,
                 now: float) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already running")
        self._requests[request_id] = _Request(prompt_ids, params, route,
                                              RequestRecord(request_id, now, len(prompt_ids)),
                                              Detokenizer(self.tokenizer, prompt_ids))

    def drop(self, request_id: str) -> bool:
        """Forget a request without an output (its consumer aborted it)."""
        return self._requests.pop(request_id, None) is not None

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    def process(self, seq: Sequence, token_id: int, now: float, logprobs: TokenLogprobs | None = None) -> bool:
        """A sampled token (with its logprobs when the request asked); True when the request finished."""
        req = self._requests.get(seq.seq_id)
        if req is None:  # aborted while its step ran
            return False
        req.token_ids.append(token_id)
        new_chars = req.detok.add(token_id)
        record = req.record
        record.token_times_s.append(now)
        if record.first_token_s is None:
            record.first_token_s = now
        text = req.detok.text
        stop = check_stop(req.token_ids, text, new_chars, req.params, self.eos_ids)
        if stop is None:
            end = len(text) - req.holdback
        elif stop.text_end < len(text):  # cut at a stop string
            end = stop.text_end
        else:  # EOS or length: release what was held back too
            req.detok.flush()
            text = req.detok.text
            end = len(text)
        delta = text[req.sent:end] if end > req.sent else ""
        req.sent = max(req.sent, end)
        out = TokenOutput(seq.seq_id, token_id, delta, logprobs=logprobs)
        if stop is not None:
            del self._requests[seq.seq_id]
            record.output_tokens, record.finish_s, record.success = len(req.token_ids), now, True
            out.finished, out.finish_reason, out.metrics = True, stop.reason, record
        self._outbox().append((req.route, out))
        return out.finished

    def fail(self, seq_id: str, message: str, now: float) -> None:
        self._end(seq_id, "error", message, now)

    def _end(self, request_id: str, reason: str, message: str, now: float) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        record = req.record
        record.output_tokens, record.finish_s, record.error = len(req.token_ids), now, message
        out = TokenOutput(request_id, None, "", True, reason, message, record)
        self._outbox().append((req.route, out))

    def end_all(self, reason: str, message: str) -> list[str]:
        """Finish every request with `reason` (engine shut down or broken) and deliver at once."""
        ids = self.request_ids
        now = time.perf_counter()
        for request_id in ids:
            self._end(request_id, reason, message, now)
        self.flush()
        return ids

    def flush(self) -> None:
        outbox = self._outbox()
        if not outbox:
            return
        self._local.outbox = []
        by_route: dict[Route, list[TokenOutput]] = {}
        for route, out in outbox:
            by_route.setdefault(route, []).append(out)
        for route, outs in by_route.items():
            try:
                route(outs)
            except Exception:  # noqa: BLE001 - e.g. a consumer's event loop closed: its requests only
                log.exception("could not deliver %d outputs", len(outs))

    def _outbox(self) -> list[tuple[Route, TokenOutput]]:
        outbox = getattr(self._local, "outbox", None)
        if outbox is None:
            outbox = self._local.outbox = []
        return outbox


# -- the engine --------------------------------------------------------------------------------

def load_profile(profile: Profile | str | Path | None, model: str, device: torch.device) -> Profile:
    """The profile `nexus` runs on: the given one, or this GPU's and model's default file.

    A path is checked against this GPU and model (Profile.load); a Profile object is used as
    given (tests pass synthetic ones).
    """
    if isinstance(profile, Profile):
        return profile
    config = resolve_config(model)
    gpu = None
    if device.type == "cuda":
        from nexus_tune.core.device import identify

        gpu = identify(device.index or 0) or None
    if profile is None:
        if gpu is None:
            raise EngineError("policy 'nexus' needs a latency profile of the GPU and model, and without a GPU "
                              "there is none to look up: pass one (--profile FILE, or profile= in Python; CPU "
                              "tests: nexus_tune.core.testing.synthetic_profile()), or use policy chunked, "
                              "prefill-first or static:N")
        path = find_profile(gpu.slug, config.name)
        if not path.is_file():
            raise EngineError(f"policy 'nexus' needs a latency profile of this GPU and model, and {path} does not "
                              f"exist; make it with: nexus-tune profile --model {model}  (or pass --profile FILE)")
        profile = path
    try:
        return Profile.load(profile, expect_gpu=gpu, expect_model_hash=config.config_hash())
    except ProfileError as e:
        raise EngineError(str(e)) from e


def _sm_layout(table: SplitTable, profile: Profile | None) -> tuple[int, list[int]]:
    """(total SMs, prefill SM counts of the splits) the scheduler and controller reason with."""
    if table.backend == GREEN_CONTEXTS:
        # The profile lists the splits whose both sides ran every kernel when it was measured.
        usable = set(profile.split_sms) if profile is not None else set(table.split_sms)
        return table.total_sms, [p for p in table.split_sms if p in usable]
    if profile is not None:
        return int(profile.gpu["sm_count"]), list(profile.split_sms)
    total = table.total_sms or NOMINAL_SMS
    return total, list(range(1, total))


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Expected start-up failures (bad policy, config, checkpoint, profile, no memory) as EngineError."""
    try:
        yield
    except EngineError:
        raise
    except (ValueError, RuntimeError) as exc:  # ConfigError and CheckpointError are ValueErrors
        raise EngineError(str(exc)) from exc


class EngineCore:
    """What `LLM` and `AsyncLLM` share: splits, runner, scheduler, graphs, loop threads."""

    def __init__(self, config: EngineConfig):
        c = self.config = config
        with _engine_errors():
            name, _ = parse_policy(c.policy)
            two_loops = name in ("nexus", "static")
            self.policy = c.policy
            self.device = resolve_device(c.device)
            cuda = self.device.type == "cuda"
            self.profile = load_profile(c.profile, c.model, self.device) if name == "nexus" else None
            knobs = c.knobs or (ControllerKnobs.for_profile(self.profile) if self.profile else ControllerKnobs())
            knobs = knobs.with_slos(parse_slos(c.slo))
            step_tokens = knobs.prefill_chunk_tokens if two_loops else c.mixed_token_budget
            # Splits first: the KV cache is sized from the memory left after them.
            self.table = SplitTable(self.device.index or 0, backend="auto" if two_loops and cuda else TIME_SHARING,
                                    warn=two_loops and cuda)
            try:
                self.runner = ModelRunner(
                    c.model, device=self.device, dtype=c.dtype, seed=c.seed, block_size=c.block_size,
                    num_kv_blocks=c.num_kv_blocks, gpu_memory_utilization=c.gpu_memory_utilization,
                    max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, max_num_batched_tokens=step_tokens)
                total, splits = _sm_layout(self.table, self.profile)
                # The controller's step times, over a private copy of the latency model: online
                # corrections must not leak into the caller's.
                step_times = (StepTimes(LatencyModel.from_dict(self.profile.latency_model.to_dict()),
                                        self.profile.step_overhead) if self.profile else None)
                self.scheduler = Scheduler(c.policy, BlockManager(self.runner.num_kv_blocks, c.block_size), knobs,
                                           max_num_seqs=c.max_num_seqs, total_sms=total, split_sms=splits,
                                           model=step_times, mixed_token_budget=c.mixed_token_budget)
                self.placement = Placement(self.table, total, two_loops, cuda=cuda)
                self.graph_report = self._capture_graphs(name, total, splits, step_tokens) if cuda else None
            except BaseException:
                self.table.close()
                raise
        self.tokenizer = self.runner.tokenizer
        self.max_model_len = self.runner.max_model_len
        self.processor = OutputProcessor(self.tokenizer)
        update = name == "nexus" and (cuda if c.online_update is None else c.online_update)
        self._stopping = threading.Event()
        self.ctx = LoopContext(self.runner, self.scheduler, self.placement, self.processor, self._stopping,
                               self._fatal, StepLog(self.device) if c.step_log else None,
                               step_times if update else None)
        self._threads: list[threading.Thread] = []
        self.failure: BaseException | None = None
        self._closed = False

    def _capture_graphs(self, policy: str, total: int, splits: list[int], prefill_tokens: int) -> Any:
        """Prefill and decode graphs for every side each phase can launch on under the policy."""
        if policy == "nexus":  # any split, or all SMs when the other phase is idle
            prefill_sms, decode_sms = splits + [total], [total - p for p in splits] + [total]
        elif policy == "static":
            prefill_sms, decode_sms = [self.scheduler.static_sms], [total - self.scheduler.static_sms]
        else:
            prefill_sms = decode_sms = [total]
        place = self.placement
        return self.runner.capture_graphs(place.sides("prefill", prefill_sms), place.sides("decode", decode_sms),
                                          total, prefill_tokens=prefill_tokens, decode_rows_apart=policy == "chunked")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop threads (again, after stop())."""
        if self._closed:
            raise EngineError("this engine was shut down")
        if self._threads:
            return
        self._stopping.clear()
        self._threads = make_loops(self.ctx)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the loop threads after their current step; requests stay queued."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def close(self) -> None:
        """Stop, end every request with finish_reason "abort", free the GPU memory, release the splits.
        Idempotent."""
        if self._closed:
            return
        self.stop()
        for request_id in self.processor.end_all("abort", "the engine shut down"):
            self.scheduler.abort(request_id)
        # The model, KV cache and decode graphs go first: graphs captured on a split's stream must
        # not outlive its green context.
        self.runner = self.ctx.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.table.close()
        self._closed = True

    def _fatal(self, exc: BaseException) -> None:
        """A loop broke outside any one request: fail everything, refuse new work (the cause is logged)."""
        self.failure = exc
        self._stopping.set()
        message = f"the engine stopped after an internal error: {type(exc).__name__}: {exc}"
        for request_id in self.processor.end_all("error", message):
            self.scheduler.abort(request_id)

    # -- requests ----------------------------------------------------------------------------

    def add(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, route: Route) -> None:
        """Queue a request; its outputs go to `route` from a loop thread. ValueError for a bad request."""
        if self._closed:
            raise EngineError("the engine was shut down")
        if self.failure is not None:
            raise EngineError(f"the engine stopped after an internal error: {self.failure}")
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        vocab = self.runner.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"request {request_id}: token ids must lie in 0..{vocab - 1}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {request_id}: the prompt has {len(ids)} tokens, and the context length "
                             f"{self.max_model_len} leaves no room for output")
        params = replace(params, max_tokens=min(params.max_tokens, self.max_model_len - len(ids)))
        now = time.perf_counter()
        self.processor.register(request_id, ids, params, route, now)
        try:
            self.scheduler.add(Sequence(request_id, ids, params, arrival_time=now))
        except ValueError:
            self.processor.drop(request_id)
            raise

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; False if it is unknown or done.

        No fence is needed here: a sequence outside a batch has no kernel left (each step's
        tokens reached the host before the step was finished), and one inside a batch is
        freed by that batch's finish, behind its fence.
        """
        known = self.processor.drop(request_id)
        return self.scheduler.abort(request_id) or known

    def stats(self) -> dict[str, Any]:
        """Queue and KV state, the split, and under nexus the controller's last decision explained
        (its predicted step times, the TBT allowance, the recent decode cycle: Controller.explain)."""
        s = self.scheduler.stats()
        controller = self.scheduler.controller
        return {"running": s["num_prefilling"] + s["num_decoding"], "waiting": s["num_waiting"],
                "kv_usage": s["kv_usage"], "free_blocks": s["free_blocks"], "total_blocks": self.scheduler.bm.num_blocks,
                "prefill_sms": s["split"] if self.scheduler.two_loops else None,
                "split_switches": self.ctx.split_switches, "num_preemptions": s["num_preemptions"],
                "failed": None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}",
                **(controller.explain() if controller is not None else {})}

    def step_records(self) -> list[StepRecord]:
        """Every step so far (needs step_log=True)."""
        if self.ctx.step_log is None:
            raise EngineError("no step log: construct the engine with step_log=True")
        return self.ctx.step_log.records()

    def step_origin_s(self) -> float:
        """`time.perf_counter()` seconds at the step log's time zero (StepRecord.start_ms counts from it)."""
        if self.ctx.step_log is None:
            raise EngineError("no step log: construct the engine with step_log=True")
        return self.ctx.step_log.created_s


_ENGINE_DOC = """
    `model`, `policy` (nexus | chunked | prefill-first | static:N) and, as keywords, any field of
    nexus_tune.core.engine_config.EngineConfig (device, profile, slo, knobs, max_num_seqs, ...), which
    says what each means and holds its default. Raises EngineError when the engine cannot start as
    configured, TypeError for a keyword that is no field.
"""


class AsyncLLM:
    __doc__ = "The engine as the server drives it: start(), generate() per request, abort(), stats()." + _ENGINE_DOC

    def __init__(self, model: str, policy: str = "nexus", **config: Any):
        self.core = EngineCore(EngineConfig(model, policy, **config))
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        # The most tokens (prompt + output) one request can hold: the context, or the KV cache when
        # smaller (the scheduler refuses what needs more blocks; the last token needs no KV slot).
        runner = self.core.runner
        self.max_request_tokens = min(self.max_model_len, runner.num_kv_blocks * runner.block_size + 1)
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._routes: dict[asyncio.AbstractEventLoop, Route] = {}

    def start(self) -> None:
        self.core.start()

    def shutdown(self) -> None:
        self.core.close()

    async def generate(self, request_id: str, prompt_token_ids: Seq[int],
                       params: SamplingParams) -> AsyncIterator[TokenOutput]:
        """One TokenOutput per new token; the last has finished=True. Leaving early aborts the request."""
        if request_id in self._queues:
            raise ValueError(f"request {request_id} is already running")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self.core.add(request_id, prompt_token_ids, params, self._route(asyncio.get_running_loop()))
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.core.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request; a `generate` still iterating it ends with an output of finish_reason "abort"."""
        self.core.abort(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(TokenOutput(request_id, None, "", True, "abort", error="the request was aborted"))

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def _route(self, loop: asyncio.AbstractEventLoop) -> Route:
        """One thread-safe hand-off per step and event loop, however many requests it carries."""
        route = self._routes.get(loop)
        if route is None:
            def route(outs: list[TokenOutput]) -> None:
                loop.call_soon_threadsafe(self._dispatch, outs)
            self._routes[loop] = route
        return route

    def _dispatch(self, outs: list[TokenOutput]) -> None:
        for out in outs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)


class _Collector:
    """LLM.generate's route: gathers outputs until every request has finished."""

    def __init__(self, request_ids: list[str]):
        self.outputs: dict[str, list[TokenOutput]] = {r: [] for r in request_ids}
        self.remaining = len(request_ids)
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, outs: list[TokenOutput]) -> None:
        with self._lock:
            for out in outs:
                self.outputs[out.request_id].append(out)
                self.remaining -= out.finished
            if self.remaining <= 0:
                self.done.set()


class LLM:
    __doc__ = "Offline generation in the spirit of vLLM's `LLM`: `generate(prompts, params)`." + _ENGINE_DOC

    def __init__(self, model: str, policy: str = "nexus", **config: Any):
        self.core = EngineCore(EngineConfig(model, policy, **config))
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Outputs in the order of `prompts` (text, or token ids); `params`: one for all, or one each."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not ids:
            return []
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(params)} SamplingParams")
        request_ids = [str(next(self._ids)) for _ in ids]
        collector = _Collector(request_ids)
        added = []
        self.core.start()
        try:
            for request_id, prompt, p in zip(request_ids, ids, params):
                self.core.add(request_id, prompt, p, collector)
                added.append(request_id)
            collector.done.wait()
        finally:
            if not collector.done.is_set():  # an error or an interrupt: drop what is still queued
                for request_id in added:
                    self.core.abort(request_id)
            self.core.stop()
        return [self._output(r, prompt, p, collector.outputs[r]) for r, prompt, p in zip(request_ids, ids, params)]

    def _output(self, request_id: str, prompt: list[int], params: SamplingParams,
                outs: list[TokenOutput]) -> RequestOutput:
        last = outs[-1]
        tokens = [o for o in outs if o.token_id is not None]
        logprobs = [o.logprobs for o in tokens] if params.logprobs is not None else None
        return RequestOutput(request_id, prompt, [o.token_id for o in tokens], "".join(o.text for o in outs),
                             last.finish_reason, last.metrics, last.error, logprobs)

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
