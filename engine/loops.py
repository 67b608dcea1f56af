"""The step loops: a prefill loop and a decode loop on disjoint SMs, or one loop on the whole GPU.

Two-loop policies (`nexus`, `static:N`) run `PrefillLoop` and `DecodeLoop` as two threads of
one process. Each step a loop asks the scheduler for a batch and its SMs (the controller decides
inside `schedule_prefill` / `schedule_decode`, so every step reads a fresh split), launches on its
side of that pre-created split (the decode side replays the CUDA graph of (split, batch bucket)),
and brings the sampled ids to the host with a pinned non-blocking copy and a wait on its OWN
event: the other loop's kernels keep running meanwhile, where a device-wide sync would stall them.

Threads, not asyncio: each loop blocks on its own event once per step (the sampled ids), and
torch releases the GIL inside its ops, graph replays and event waits, so while one thread waits
the other launches; one asyncio loop would need those waits turned into polling and would still
serialise both phases' host work. Measured on the H100 (GPU-FACTS.md): a decode thread replaying
its graph beside a prefill thread on a 64/68 split took 1.58 ms per step against 1.20 ms alone,
the shared HBM bandwidth rather than the host. `benchmarks/engine_policies.py` measures the same
ratio inside this engine.

Across the two streams:
- Handoff: a prefill step that completes a prompt records an event on the prefill stream; the
  decode loop makes its stream wait on the newest such event (`stream.wait_event`) before it
  launches, so the order (KV written, then read) is kept on the GPU, not by a host sync in the
  decode loop. (The prefill loop waits on the same event for its sampled first tokens, the
  stop checks need them, so by the time decode launches the wait is normally already met.)
- KV reuse: every batch is finished in the scheduler with its step's event as the fence
  (`BlockManager.free(seq, fence)`), so blocks a step released reach the other stream only
  once that event has passed.

Single-loop policies run on the whole GPU: `MixedLoop` (`chunked`, vLLM v1: the decode tokens are
1-token chunks of the same prefill-style forward as the prompt chunks) and `PrefillFirstLoop`
(`prefill-first`, SGLang's default).

A batch that raises is run again one sequence at a time: the sequences that still raise finish
alone with an error and the loop goes on. Re-running is safe because a step only rewrites the KV
slots it owns and the scheduler's state changes after the step, never during it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine import sampling
from engine.model_runner import DecodeBatch as RunnerDecode
from engine.model_runner import ModelRunner
from engine.model_runner import PrefillBatch as RunnerPrefill
from nexus_tune.partition import GREEN_CONTEXTS, SplitTable
from nexus_tune.scheduler import DecodeBatch, PrefillBatch, Scheduler
from nexus_tune.sequence import Sequence

log = logging.getLogger(__name__)

# An idle loop sleeps on the scheduler's condition; the timeout only bounds a missed wake-up
# (a notify between an empty schedule_* and the wait).
IDLE_WAIT_S = 0.005


class OutputSink(Protocol):
    """Where sampled tokens go (engine/llm.py: detokenize, stop checks, streaming)."""

    def process(self, seq: Sequence, token_id: int, now: float) -> bool:
        """Record `seq`'s new token (not yet appended to it); True if the request is finished."""
        ...

    def fail(self, seq_id: str, message: str, now: float) -> None:
        """The request failed inside the engine: finish it alone with an error."""
        ...

    def flush(self) -> None:
        """Deliver what the calling thread recorded since its last flush (one hand-off per step)."""
        ...


# -- where a step runs ------------------------------------------------------------------------

class Placement:
    """The scheduler's SM counts -> the stream a step launches on and the key of its decode graphs.

    With green contexts, prefill on P SMs runs on split P's prefill stream and decode on D SMs on
    split (total - D)'s decode stream; all SMs means the table's whole-GPU stream. Under
    time-sharing (no green contexts, or a CPU) every SM count maps to the one shared stream pair,
    and single-loop policies always use the whole-GPU stream.
    """

    def __init__(self, table: SplitTable, total_sms: int, two_loops: bool, graphs: bool):
        self.table, self.total_sms = table, total_sms
        self.disjoint = two_loops and table.backend == GREEN_CONTEXTS
        self.shared = None if self.disjoint or not two_loops else next(iter(table))
        self.graphs = graphs  # decode CUDA graphs were captured (CUDA only)

    def prefill_stream(self, sms: int) -> Any:
        if self.shared is not None:
            return self.shared.prefill_stream
        if not self.disjoint or sms >= self.total_sms:
            return self.table.whole
        return self.table[sms].prefill_stream

    def decode_key(self, sms: int) -> Hashable:
        """The decode graphs' key: decode SM count under green contexts, else the one shared stream."""
        if self.disjoint:
            return min(sms, self.total_sms)
        return "shared" if self.shared is not None else "whole"

    def decode_stream(self, sms: int) -> Any:
        key = self.decode_key(sms)
        if key == "shared":
            return self.shared.decode_stream
        if key == "whole" or key >= self.total_sms:
            return self.table.whole
        return self.table[self.total_sms - key].decode_stream

    def graph_streams(self, decode_sms: Iterable[int]) -> dict[Hashable, Any]:
        """Streams to capture decode graphs on, one per key the given decode SM counts use."""
        return {self.decode_key(d): self.decode_stream(d) for d in decode_sms}


# -- per-step timings -------------------------------------------------------------------------

@dataclass
class StepRecord:
    """One step. GPU times come from CUDA events (host wall time on a CPU); ms everywhere."""

    loop: str  # prefill | decode | mixed | single
    kind: str  # prefill | decode | mixed (chunked: a prefill-style forward holding decode rows)
    sms: int
    num_seqs: int
    prefill_tokens: int  # P_T: new tokens of the prompt chunks
    prefill_kv: int  # KV_p: prefix tokens those chunks attend to
    decode_seqs: int  # B_d
    decode_kv: int  # KV_d
    beside_prefill: int  # decode steps of two-loop policies: tokens of the prefill in flight at launch
    beside_prefill_kv: int  # and its prefix tokens
    sched_ms: float  # choosing the batch (controller included)
    host_ms: float  # launch to sampled ids on the host
    gpu_ms: float | None = None
    start_ms: float | None = None  # on the log's timeline: its reference event (a CPU: its creation)
    end_ms: float | None = None
    failed: bool = False  # part of the batch raised and it was re-run one sequence at a time


class StepLog:
    """An optional log of every step. Events are resolved into ms when `records()` is read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._ref = None
        self.created_s = time.perf_counter()
        if self.cuda:
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(torch.cuda.current_stream(device))
        self._lock = threading.Lock()
        self._entries: list[tuple[StepRecord, Any, Any]] = []

    def add(self, record: StepRecord, start: Any, end: Any, host_start_s: float) -> None:
        if not self.cuda:
            record.start_ms = (host_start_s - self.created_s) * 1e3
            record.end_ms = record.start_ms + record.host_ms
        with self._lock:
            self._entries.append((record, start, end))

    def records(self) -> list[StepRecord]:
        with self._lock:
            entries = list(self._entries)
        for record, start, end in entries:
            if self.cuda and record.gpu_ms is None:
                end.synchronize()
                record.gpu_ms = start.elapsed_time(end)
                record.start_ms = self._ref.elapsed_time(start)
                record.end_ms = self._ref.elapsed_time(end)
        return [r for r, _, _ in entries]


# -- one step: rows in, tokens out ------------------------------------------------------------

@dataclass
class _Row:
    """One sequence's part of a step: new tokens at `prefix`; `sample` if its logits give a token."""

    seq: Sequence
    tokens: list[int]
    prefix: int
    sample: bool


def _prefill_rows(batch: PrefillBatch) -> list[_Row]:
    return [_Row(s, s.token_ids[p:p + n], p, last)
            for s, n, p, last in zip(batch.seqs, batch.chunk_lens, batch.prefix_lens, batch.last)]


def _decode_rows(batch: DecodeBatch) -> list[_Row]:
    return [_Row(s, [s.token_ids[-1]], s.num_tokens - 1, True) for s in batch.seqs]


@dataclass
class _Outcome:
    tokens: list[int | None]  # per row: the sampled id, None where nothing was sampled or it failed
    failed: dict[str, str]  # seq_id -> error message
    fence: Any  # event after the step's last kernel (None on a CPU)
    start: Any
    host_start_s: float
    host_ms: float


def _on(stream: Any) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class StepRunner:
    """Runs rows through the ModelRunner on one stream, samples, and fetches the ids to the host.

    One per loop: it owns that loop's pinned buffer and events.
    """

    def __init__(self, runner: ModelRunner, timing: bool):
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.timing = timing  # timing events: the step log or the latency model reads them
        self._pinned = self._alloc(max(runner.max_num_seqs, 1))

    def _alloc(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, dtype=torch.int64, pin_memory=self.cuda)

    def run(self, rows: list[_Row], kind: str, stream: Any, key: Hashable | None = None,
            wait: Any = None) -> _Outcome:
        """`kind` "prefill": one packed prefill-style forward; "decode": a decode step (its graph, given `key`)."""
        t0 = time.perf_counter()
        start = self._event(stream)
        if wait is not None:
            stream.wait_event(wait)
        try:
            tokens, fence = self._attempt(rows, kind, stream, key)
            failed = {}
        except Exception:  # noqa: BLE001 - isolate the culprit(s) below
            log.warning("a %s batch of %d sequences raised; running them one at a time", kind, len(rows),
                        exc_info=True)
            tokens, failed = [], {}
            for row in rows:
                try:
                    tokens += self._attempt([row], kind, stream, key)[0]
                except Exception as exc:  # noqa: BLE001 - one request's fault must not stop the loop
                    log.exception("request %s failed inside the engine", row.seq.seq_id)
                    tokens.append(None)
                    failed[row.seq.seq_id] = f"{type(exc).__name__}: {exc}"
            fence = self._fence(stream)  # after every retry's kernels
        return _Outcome(tokens, failed, fence, start, t0, (time.perf_counter() - t0) * 1e3)

    def _event(self, stream: Any) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=self.timing)
        event.record(stream)
        return event

    def _fence(self, stream: Any) -> Any:
        """An event after everything queued on `stream`, waited for by this thread only: the other
        loop's stream keeps running (a device-wide sync would stall it)."""
        event = self._event(stream)
        if event is not None:
            event.synchronize()
        return event

    def _attempt(self, rows: list[_Row], kind: str, stream: Any, key: Hashable | None) -> tuple[list[int | None], Any]:
        tables = [r.seq.block_table for r in rows]
        if kind == "decode":
            batch = RunnerDecode([r.tokens[0] for r in rows], [r.prefix for r in rows], tables)
            logits = self.runner.decode(batch, key=key, stream=stream)
        else:
            batch = RunnerPrefill([r.tokens for r in rows], [r.prefix for r in rows], tables)
            logits = self.runner.prefill(batch, stream)
        picked = [i for i, r in enumerate(rows) if r.sample]
        host = None
        if picked:
            with _on(stream):
                if len(picked) < logits.shape[0]:  # the index goes up pinned, without a stream sync
                    index = torch.tensor(picked)
                    logits = logits.index_select(0, index.pin_memory().to(logits.device, non_blocking=True)
                                                 if self.cuda else index)
                # steps = tokens generated so far: a seeded request's noise depends on (seed, index)
                # only, so a request preempted and recomputed replays the same tokens.
                ids = sampling.sample(logits, [rows[i].seq.params for i in picked],
                                      [rows[i].seq.num_output_tokens for i in picked])
                if self.cuda:  # to pinned memory without blocking; the fence below says when it landed
                    if ids.numel() > self._pinned.numel():
                        self._pinned = self._alloc(ids.numel())
                    host = self._pinned[: ids.numel()]
                    host.copy_(ids, non_blocking=True)
                else:
                    host = ids
        fence = self._fence(stream)
        out: list[int | None] = [None] * len(rows)
        for i, token in zip(picked, host.tolist() if host is not None else []):
            out[i] = token
        return out, fence


# -- the shared state of the loops -------------------------------------------------------------

@dataclass
class LoopContext:
    """What every loop of one engine shares."""

    runner: ModelRunner
    scheduler: Scheduler
    placement: Placement
    sink: OutputSink
    stopping: threading.Event
    on_fatal: Callable[[BaseException], None]
    step_log: StepLog | None = None
    latency_model: Any = None  # nexus: fed every step's measured time (LatencyModel.update)
    split_switches: int = 0
    # Two-loop policies: the prefill in flight (tokens, prefix) and the newest event after a
    # prefill step that completed a prompt (the decode stream waits on it).
    prefill_load: tuple[int, int] = (0, 0)
    handoff: Any = None
    _last_split: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note_split(self) -> None:
        """Count changes of the policy's split (each loop reads it after every schedule call)."""
        split = self.scheduler.split
        with self._lock:
            if self._last_split is not None and split != self._last_split:
                self.split_switches += 1
            self._last_split = split

    @property
    def timing(self) -> bool:
        return self.step_log is not None or self.latency_model is not None

    def finish_rows(self, rows: list[_Row], outcome: _Outcome, now: float) -> set[str]:
        """Hand sampled tokens to the sink; fail the rows that raised. Returns the finished seq ids."""
        finished = set()
        failed = dict(outcome.failed)
        for row, token in zip(rows, outcome.tokens):
            if token is None or row.seq.seq_id in failed:
                continue
            try:
                if self.sink.process(row.seq, token, now):
                    finished.add(row.seq.seq_id)
            except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer error: this request only
                log.exception("request %s failed while its output was processed", row.seq.seq_id)
                failed[row.seq.seq_id] = f"{type(exc).__name__}: {exc}"
        for seq_id, message in failed.items():
            # Aborted while in flight: the scheduler frees its blocks behind this step's fence.
            self.scheduler.abort(seq_id, outcome.fence)
            self.sink.fail(seq_id, message, now)
        return finished

    def record(self, loop: str, kind: str, sms: int, prefill: PrefillBatch | None, decode: DecodeBatch | None,
               outcome: _Outcome, sched_ms: float, beside: tuple[int, int] = (0, 0)) -> None:
        """Log the step and feed its time to the latency model (nexus' online correction)."""
        rec = StepRecord(
            loop=loop, kind=kind, sms=sms,
            num_seqs=(len(prefill.seqs) if prefill else 0) + (len(decode.seqs) if decode else 0),
            prefill_tokens=prefill.num_tokens if prefill else 0, prefill_kv=prefill.prefix_tokens if prefill else 0,
            decode_seqs=len(decode.seqs) if decode else 0, decode_kv=decode.kv_tokens if decode else 0,
            beside_prefill=beside[0], beside_prefill_kv=beside[1], sched_ms=sched_ms, host_ms=outcome.host_ms,
            failed=bool(outcome.failed))
        if outcome.fence is None:
            rec.gpu_ms = outcome.host_ms  # a CPU: the step ran inside the host call
        if self.step_log is not None:
            self.step_log.add(rec, outcome.start, outcome.fence, outcome.host_start_s)
        if self.latency_model is not None and not outcome.failed and kind != "mixed":
            self._update_model(rec, outcome)

    def _update_model(self, rec: StepRecord, outcome: _Outcome) -> None:
        ms = outcome.start.elapsed_time(outcome.fence) if outcome.fence is not None else rec.gpu_ms
        try:
            if rec.kind == "prefill":
                self.latency_model.update("prefill", rec.prefill_tokens, rec.prefill_kv, rec.sms, ms)
            else:
                self.latency_model.update("decode", rec.decode_seqs, rec.decode_kv, rec.sms, ms,
                                          rec.beside_prefill, rec.beside_prefill_kv)
        except ValueError as exc:  # e.g. a step too short to time: skip it
            log.debug("latency model update skipped: %s", exc)
            return
        # The controller caches predictions, stale after a correction. A dict clear is atomic
        # under the GIL, so this needs no scheduler lock.
        self.scheduler.controller.clear_cache()


# -- the loops -------------------------------------------------------------------------------------

class Loop(threading.Thread):
    """A thread that runs `step()` until the engine stops; sleeps on the scheduler when idle."""

    role = "loop"

    def __init__(self, ctx: LoopContext):
        super().__init__(name=f"nexus-{self.role}", daemon=True)
        self.ctx = ctx
        self.steps = StepRunner(ctx.runner, ctx.timing)

    def run(self) -> None:
        # A new thread has no current CUDA context: bind it before the first launch (GPU-FACTS.md).
        self.ctx.placement.table.bind_thread()
        with torch.inference_mode():
            while not self.ctx.stopping.is_set():
                try:
                    busy = self.step()
                except BaseException as exc:  # noqa: BLE001 - a broken loop must not hang every request
                    log.exception("the %s loop failed; stopping the engine", self.role)
                    self.ctx.on_fatal(exc)
                    return
                if not busy:
                    self.ctx.scheduler.wait(IDLE_WAIT_S)

    def step(self) -> bool:
        """Run one batch; False if there was none."""
        raise NotImplementedError

    def _schedule(self, call: Callable[[float], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        batch = call(t0)
        return batch, (time.perf_counter() - t0) * 1e3

    def _sms(self, batch: PrefillBatch | DecodeBatch) -> int:
        return batch.sms if batch.sms is not None else self.ctx.placement.total_sms  # None: the whole GPU

    def _prefill(self, batch: PrefillBatch, sched_ms: float, handoff: bool = False) -> None:
        ctx = self.ctx
        sms = self._sms(batch)
        rows = _prefill_rows(batch)
        outcome = self.steps.run(rows, "prefill", ctx.placement.prefill_stream(sms))
        if handoff and any(batch.last):
            ctx.handoff = outcome.fence  # set before these sequences can reach the decode loop
        now = time.perf_counter()
        finished = ctx.finish_rows(rows, outcome, now)
        ctx.scheduler.finish_prefill(batch, now, [t or 0 for t in outcome.tokens], finished, outcome.fence)
        ctx.sink.flush()
        ctx.record(self.role, "prefill", sms, batch, None, outcome, sched_ms)

    def _decode(self, batch: DecodeBatch, sched_ms: float, wait: Any = None,
                beside: tuple[int, int] = (0, 0)) -> None:
        ctx, place = self.ctx, self.ctx.placement
        sms = self._sms(batch)
        rows = _decode_rows(batch)
        key = place.decode_key(sms) if place.graphs else None
        outcome = self.steps.run(rows, "decode", place.decode_stream(sms), key, wait)
        now = time.perf_counter()
        finished = ctx.finish_rows(rows, outcome, now)
        ctx.scheduler.finish_decode(batch, now, [t or 0 for t in outcome.tokens], finished, outcome.fence)
        ctx.sink.flush()
        ctx.record(self.role, "decode", sms, None, batch, outcome, sched_ms, beside)


class PrefillLoop(Loop):
    """Two-loop policies: prompt chunks on the prefill side of the current split."""

    role = "prefill"

    def step(self) -> bool:
        ctx = self.ctx
        batch, sched_ms = self._schedule(ctx.scheduler.schedule_prefill)
        if batch is None:
            return False
        ctx.note_split()
        ctx.prefill_load = (batch.num_tokens, batch.prefix_tokens)
        try:
            self._prefill(batch, sched_ms, handoff=True)
        finally:
            ctx.prefill_load = (0, 0)
        return True


class DecodeLoop(Loop):
    """Two-loop policies: every decoding sequence, one token each, on the decode side of the split."""

    role = "decode"

    def step(self) -> bool:
        ctx = self.ctx
        batch, sched_ms = self._schedule(ctx.scheduler.schedule_decode)
        if batch is None:
            return False
        ctx.note_split()
        self._decode(batch, sched_ms, wait=ctx.handoff, beside=ctx.prefill_load)
        return True


class MixedLoop(Loop):
    """`chunked` (vLLM v1): one forward per step holding decode tokens (1-token chunks) and prompt chunks."""

    role = "mixed"

    def step(self) -> bool:
        ctx = self.ctx
        batch, sched_ms = self._schedule(ctx.scheduler.schedule_mixed)
        if batch is None:
            return False
        prefill, decode = batch.prefill, batch.decode
        if prefill is None:  # decode only: the graph path, as vLLM runs a pure-decode step
            self._decode(decode, sched_ms)
        elif decode is None:
            self._prefill(prefill, sched_ms)
        else:
            self._mixed(prefill, decode, sched_ms)
        return True

    def _mixed(self, prefill: PrefillBatch, decode: DecodeBatch, sched_ms: float) -> None:
        ctx, total = self.ctx, self.ctx.placement.total_sms
        dec_rows, pre_rows = _decode_rows(decode), _prefill_rows(prefill)
        outcome = self.steps.run(dec_rows + pre_rows, "prefill", ctx.placement.prefill_stream(total))
        now = time.perf_counter()
        finished = ctx.finish_rows(dec_rows + pre_rows, outcome, now)
        tokens = [t or 0 for t in outcome.tokens]
        # Each part is finished with its own ids: the scheduler retires the ids it is given at once.
        in_decode = {s.seq_id for s in decode.seqs}
        ctx.scheduler.finish_decode(decode, now, tokens[: len(dec_rows)], finished & in_decode, outcome.fence)
        ctx.scheduler.finish_prefill(prefill, now, tokens[len(dec_rows):], finished - in_decode, outcome.fence)
        ctx.sink.flush()
        ctx.record(self.role, "mixed", total, prefill, decode, outcome, sched_ms)


class PrefillFirstLoop(Loop):
    """`prefill-first` (SGLang): a prefill batch whenever one is ready, a decode batch otherwise."""

    role = "single"

    def step(self) -> bool:
        batch, sched_ms = self._schedule(self.ctx.scheduler.schedule_step)
        if batch is None:
            return False
        if isinstance(batch, PrefillBatch):
            self._prefill(batch, sched_ms)
        else:
            self._decode(batch, sched_ms)
        return True


def make_loops(ctx: LoopContext) -> list[Loop]:
    """The loop threads of the context's policy (not started)."""
    policy = ctx.scheduler.policy
    if ctx.scheduler.two_loops:
        return [PrefillLoop(ctx), DecodeLoop(ctx)]
    if policy == "chunked":
        return [MixedLoop(ctx)]
    return [PrefillFirstLoop(ctx)]
