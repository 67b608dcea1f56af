"""The step loops: a prefill loop and a decode loop on disjoint SMs, or one loop on the whole GPU.

Every loop runs the same step (`Loop.step`, nano-vllm's schedule -> run -> postprocess, pipelined):

    batch = schedule()          # the scheduler's next batch (the controller picks its SMs inside)
    launched = launch(batch)    # inputs up, graph replay, sampling, ids to pinned memory: no wait
    finish(previous)            # the previous step's ids to the host, outputs, scheduler bookkeeping

so the host prepares and launches step n+1 while the GPU runs step n, and the previous step's
outputs are handled while the GPU runs this one (vLLM v1's async scheduling; SGLang's overlap
scheduler). A sequence of step n rides in step n+1 with its token still on the device: the runner
gathers it there from step n's sampled ids (nexus_tune/core/scheduler.py, "Lookahead"). Only a batch
of decode rows may be followed this way; after a step with prompt chunks the loop finishes it
before scheduling (their sequences' next state is not known until then).

Two-loop policies (`nexus`, `static:N`) run `PrefillLoop` and `DecodeLoop` as two threads of one
process, each on its side of the current split (nexus_tune/engine/cuda_graphs.py: one graph per side and
size bucket). Threads, not asyncio: torch releases the GIL inside graph replays and event waits,
so while one thread waits the other launches; a wait is always on the loop's OWN event (a
device-wide sync would stall the other loop's kernels).

Across the two streams:
- Handoff: a sequence reaches the decode loop only once the prefill loop has collected the step
  that completed its prompt (the host waited on that step's event), so its KV is written before
  any later launch on either stream and the decode stream waits on nothing. (Waiting on the newest
  prefill event instead held decode steps behind the prefill in flight: 58-69 stalls of up to
  56 ms in 18 s at 8 req/s on the H200, docs/performance.md.)
- KV reuse: every batch is finished in the scheduler with its step's event as the fence
  (`BlockManager.free(seq, fence)`), so blocks a step released reach the other stream only
  once that event has passed.

Single-loop policies run on the whole GPU: `MixedLoop` (`chunked`, vLLM v1: the decode tokens are
1-token chunks of the same prefill-style forward as the prompt chunks) and `PrefillFirstLoop`
(`prefill-first`, SGLang's default).

A batch whose launch raises is run again one sequence at a time, each waited for: the sequences
that still raise finish alone with an error and the loop goes on. Re-running is safe because a
step only rewrites the KV slots it owns and the scheduler's state changes after the step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nexus_tune.engine import sampling
from nexus_tune.engine.model_runner import ModelRunner, on_stream
from nexus_tune.engine.step_inputs import DecodeInput, PrefillInput
from nexus_tune.core.overhead import record_prefix
from nexus_tune.core.partition import GREEN_CONTEXTS, SplitTable
from nexus_tune.core.scheduler import DecodeBatch, MixedBatch, PrefillBatch, Scheduler
from nexus_tune.core.sequence import Sequence

log = logging.getLogger(__name__)

# An idle loop sleeps on the scheduler's condition; the timeout only bounds a missed wake-up
# (a notify between an empty schedule_* and the wait).
IDLE_WAIT_S = 0.005


class OutputSink(Protocol):
    """Where sampled tokens go (nexus_tune/engine/llm.py: detokenize, stop checks, streaming)."""

    def process(self, seq: Sequence, token_id: int, now: float, logprobs: Any = None) -> bool:
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
    """The scheduler's SM counts -> the stream a step launches on and the key of its graphs.

    With green contexts, prefill on P SMs runs on split P's prefill stream and decode on D SMs on
    split (total - D)'s decode stream; all SMs means the table's whole-GPU stream. A key is the
    side's SM count there. Under time-sharing every SM count maps to the one shared stream pair
    ("shared"), and single-loop policies always use the whole-GPU stream ("whole"). An engine on
    a CPU has no streams (None), whatever the machine has.
    """

    def __init__(self, table: SplitTable, total_sms: int, two_loops: bool, cuda: bool):
        self.table, self.total_sms = table, total_sms
        self.disjoint = two_loops and table.backend == GREEN_CONTEXTS
        self.shared = None if self.disjoint or not two_loops else next(iter(table))
        self.cuda = cuda  # CUDA streams and graphs (captured at start)

    def key(self, sms: int) -> Hashable:
        if self.disjoint:
            return min(sms, self.total_sms)
        return "shared" if self.shared is not None else "whole"

    def stream(self, phase: str, sms: int) -> Any:
        """The stream of `phase`'s side holding `sms` SMs."""
        key = self.key(sms)
        if not self.cuda:
            return None
        if key == "shared":
            return self.shared.prefill_stream if phase == "prefill" else self.shared.decode_stream
        if key == "whole" or key >= self.total_sms:
            return self.table.whole
        split = self.table[key] if phase == "prefill" else self.table[self.total_sms - key]
        return split.prefill_stream if phase == "prefill" else split.decode_stream

    def sides(self, phase: str, sms: Iterable[int]) -> dict[Hashable, tuple[Any, int | None]]:
        """Graph sides of `phase` for these SM counts: key -> (stream, SMs, None for the whole GPU)."""
        return {self.key(n): (self.stream(phase, n), n if self.disjoint and n < self.total_sms else None)
                for n in sms}


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
    beside_prefill_kv: int  # and the prefix it is priced at (PrefillBatch.priced_prefix)
    sched_ms: float  # choosing the batch (controller included)
    host_ms: float  # launch to sampled ids on the host
    gpu_ms: float | None = None
    start_ms: float | None = None  # on the log's timeline: its reference event (a CPU: its creation)
    end_ms: float | None = None
    failed: bool = False  # part of the batch raised and it was re-run one sequence at a time
    prefill_pairs: int = 0  # causal (query, key) pairs of the prompt chunks (PrefillBatch.attention_pairs)
    cycle_ms: float | None = None  # the loop's wall time per step: the previous step's end (or this one's
    # schedule call, after idling) to the end of this one's bookkeeping
    predicted_ms: float | None = None  # nexus: the kernel time the latency model expected, before this step
    beside_decode: int = 0  # prefill steps of two-loop policies: sequences the decode loop was running at launch


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
            if self.cuda and record.start_ms is None:
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
    src: int = -1  # its token is entry `src` of the previous launch's sampled ids, still on the device
    step: int = 0  # tokens the sequence generated before this step's (seeded sampling)


def _prefill_rows(batch: PrefillBatch) -> list[_Row]:
    return [_Row(s, s.token_ids[p:p + n], p, last, step=s.num_output_tokens)
            for s, n, p, last in zip(batch.seqs, batch.chunk_lens, batch.prefix_lens, batch.last)]


def _decode_rows(batch: DecodeBatch, on_device: dict[str, int]) -> list[_Row]:
    rows = []
    for seq, kv_len, pending in zip(batch.seqs, batch.kv_lens, batch.pending):
        src = on_device[seq.seq_id] if pending else -1  # KeyError: a pending token nobody sampled
        rows.append(_Row(seq, [0 if pending else seq.token_ids[-1]], kv_len - 1, True, src,
                         seq.num_output_tokens + pending))
    return rows


@dataclass
class _Launch:
    """A step handed to the GPU: its sampled ids reach `host` once `end` has passed."""

    rows: list[_Row]
    picked: list[int]  # rows that sample
    host: Any  # pinned int64 ids (CUDA), the ids themselves (CPU)
    stream: Any
    start: Any  # events (None on a CPU); `end` follows the step's last kernel and its copy to the host
    end: Any
    host_start_s: float
    host_ms: float  # host time to launch it
    tokens: list[int | None] | None = None  # per row, once collected (None: nothing sampled, or it failed)
    failed: dict[str, str] = field(default_factory=dict)  # seq_id -> error message
    logprobs: Any = None  # sampling.BatchLogprobs of the picked rows that asked for logprobs, on their way
    token_logprobs: list[Any] | None = None  # per row, once collected (None: not asked)


_NO_IDS = torch.empty(0, dtype=torch.int64)  # a step in which no row samples


class StepRunner:
    """Launches rows through the ModelRunner on one stream, samples, and brings the ids back.

    One per loop: it owns that loop's pinned buffers and remembers the last launch's sampled ids
    on the device (`on_device`), which the next step's pending tokens are gathered from.
    """

    def __init__(self, runner: ModelRunner, timing: bool):
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.timing = timing  # timing events: the step log or the latency model reads them
        # Two buffers take turns: launch n+1 copies into one while the host reads step n's from the other.
        self._pinned = [self._alloc(max(runner.max_num_seqs, 1)) for _ in range(2)]
        self._turn = 0
        self._last: _Launch | None = None
        self._ids: torch.Tensor | None = None  # the last launch's sampled ids, on the device
        self.on_device: dict[str, int] = {}  # seq_id -> its entry in them

    def _alloc(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, dtype=torch.int64, pin_memory=self.cuda)

    def launch(self, rows: list[_Row], kind: str, stream: Any, key: Hashable | None = None) -> _Launch:
        """`kind` "prefill": one packed prefill-style forward; "decode": a decode step (graphs under `key`)."""
        t0 = time.perf_counter()
        if stream is not None and self._last is not None and self._last.stream is not stream:
            stream.wait_event(self._last.end)  # the previous step's ids feed this one
        start = self._event(stream)
        ids = self._ids
        try:
            launched = self._launch(rows, kind, stream, key, ids, start, t0)
        except Exception:  # noqa: BLE001 - isolate the culprit(s) below
            log.warning("a %s batch of %d sequences raised; running them one at a time", kind, len(rows),
                        exc_info=True)
            launched = self._one_at_a_time(rows, kind, stream, key, ids, start, t0)
        self._last = launched
        return launched

    def collect(self, launched: _Launch) -> _Launch:
        """Wait for the step's ids (this thread only) and spread them over its rows."""
        if launched.tokens is None:
            if launched.end is not None:
                launched.end.synchronize()
            out: list[int | None] = [None] * len(launched.rows)
            out_lp: list[Any] = [None] * len(launched.rows)
            for i, token in zip(launched.picked, launched.host.tolist()):
                out[i] = token
            if launched.logprobs is not None:
                for i, lp in zip(launched.picked, launched.logprobs.rows()):
                    out_lp[i] = lp
            launched.tokens, launched.token_logprobs = out, out_lp
        return launched

    def _launch(self, rows: list[_Row], kind: str, stream: Any, key: Hashable | None, prev_ids: Any,
                start: Any, t0: float) -> _Launch:
        tables = [r.seq.block_table for r in rows]
        src = [r.src for r in rows]
        if kind == "decode":
            keys = [(r.seq.seq_id, r.seq.num_preemptions) for r in rows]
            batch = DecodeInput([r.tokens[0] for r in rows], [r.prefix for r in rows], tables, src, keys)
            logits = self.runner.decode(batch, key=key, stream=stream, prev_ids=prev_ids)
        else:
            batch = PrefillInput([r.tokens for r in rows], [r.prefix for r in rows], tables, src)
            logits = self.runner.prefill(batch, stream, key=key, prev_ids=prev_ids)
        picked = [i for i, r in enumerate(rows) if r.sample]
        host, ids, lps = _NO_IDS, None, None
        with on_stream(stream):
            if picked:
                if len(picked) < logits.shape[0]:  # the index goes up pinned, without a stream sync
                    index = torch.tensor(picked)
                    logits = logits.index_select(0, index.pin_memory().to(logits.device, non_blocking=True)
                                                 if self.cuda else index)
                # steps = tokens generated before: a seeded request's noise depends on (seed, index)
                # only, so a request preempted and recomputed replays the same tokens.
                params = [rows[i].seq.params for i in picked]
                history, pending = self._histories([rows[i] for i in picked], prev_ids)
                ids = sampling.sample(logits, params, [rows[i].step for i in picked], history, pending)
                lps = sampling.logprobs(logits, ids, params)  # None, and no work, unless a row asked
                host = self._to_host(ids)
            end = self._event(stream, timing=self.timing)
        self._ids, self.on_device = ids, {rows[i].seq.seq_id: j for j, i in enumerate(picked)}
        return _Launch(rows, picked, host, stream, start, end, t0, (time.perf_counter() - t0) * 1e3, logprobs=lps)

    def _histories(self, rows: list[_Row], prev_ids: Any) -> tuple[list[list[int]] | None, Any]:
        """What penalties read (sampling.sample's token_ids and pending_ids): None, None unless a
        row has a penalty. A token still on the device is -1 in its row's history."""
        if not any(r.seq.params.penalized for r in rows):
            return None, None
        history = [r.seq.token_ids + [-1] if r.src >= 0 and r.seq.params.penalized else r.seq.token_ids
                   for r in rows]
        if all(r.src < 0 for r in rows):
            return history, None
        src = torch.tensor([max(r.src, 0) for r in rows])
        return history, prev_ids.index_select(0, src.pin_memory().to(prev_ids.device, non_blocking=True)
                                              if self.cuda else src)

    def _one_at_a_time(self, rows: list[_Row], kind: str, stream: Any, key: Hashable | None, prev_ids: Any,
                       start: Any, t0: float) -> _Launch:
        tokens: list[int | None] = []
        logprobs: list[Any] = []
        failed: dict[str, str] = {}
        for row in rows:
            try:
                one = self.collect(self._launch([row], kind, stream, key, prev_ids, None, t0))
                tokens += one.tokens
                logprobs += one.token_logprobs
            except Exception as exc:  # noqa: BLE001 - one request's fault must not stop the loop
                log.exception("request %s failed inside the engine", row.seq.seq_id)
                tokens.append(None)
                logprobs.append(None)
                failed[row.seq.seq_id] = f"{type(exc).__name__}: {exc}"
        self._ids, self.on_device = None, {}  # every token reached the host: the next step takes them there
        end = self._event(stream)  # after every retry's kernels
        return _Launch(rows, [], _NO_IDS, stream, start, end, t0, (time.perf_counter() - t0) * 1e3, tokens, failed,
                       token_logprobs=logprobs)

    def _to_host(self, ids: torch.Tensor) -> Any:
        if not self.cuda:
            return ids
        if ids.numel() > self._pinned[0].numel():
            self._pinned = [self._alloc(ids.numel()) for _ in range(2)]
        host = self._pinned[self._turn][: ids.numel()]
        self._turn ^= 1
        host.copy_(ids, non_blocking=True)  # `end` says when it landed
        return host

    def _event(self, stream: Any, timing: bool | None = None) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=self.timing if timing is None else timing)
        event.record(stream)
        return event


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
    # Two-loop policies: the prefill in flight (tokens, prefix), and the sequences the decode loop runs
    # (0 while it idles).
    prefill_load: tuple[int, int] = (0, 0)
    decode_load: int = 0
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

    def finish_rows(self, launched: _Launch, now: float) -> set[str]:
        """Hand sampled tokens to the sink; fail the rows that raised. Returns the finished seq ids."""
        finished = set()
        failed = dict(launched.failed)
        for row, token, lp in zip(launched.rows, launched.tokens, launched.token_logprobs):
            if token is None or row.seq.seq_id in failed:
                continue
            try:
                if self.sink.process(row.seq, token, now, lp):
                    finished.add(row.seq.seq_id)
            except Exception as exc:  # noqa: BLE001 - e.g. a detokenizer error: this request only
                log.exception("request %s failed while its output was processed", row.seq.seq_id)
                failed[row.seq.seq_id] = f"{type(exc).__name__}: {exc}"
        for seq_id, message in failed.items():
            # Aborted while in flight: the scheduler frees its blocks behind this step's fence.
            self.scheduler.abort(seq_id, launched.end)
            self.sink.fail(seq_id, message, now)
        return finished

    def record(self, step: _Step, cycle_ms: float) -> None:
        """Log the step and feed its times to the controller's StepTimes (nexus' online corrections)."""
        prefill, decode, launched = step.prefill, step.decode, step.launched
        rec = StepRecord(
            loop=step.loop, kind=step.kind, sms=step.sms,
            num_seqs=(len(prefill.seqs) if prefill else 0) + (len(decode.seqs) if decode else 0),
            prefill_tokens=prefill.num_tokens if prefill else 0, prefill_kv=prefill.prefix_tokens if prefill else 0,
            prefill_pairs=prefill.attention_pairs if prefill else 0,
            decode_seqs=len(decode.seqs) if decode else 0, decode_kv=decode.kv_tokens if decode else 0,
            beside_prefill=step.beside[0], beside_prefill_kv=step.beside[1], beside_decode=step.beside_decode,
            sched_ms=step.sched_ms,
            host_ms=launched.host_ms, failed=bool(launched.failed), cycle_ms=cycle_ms)
        if launched.end is None:
            rec.gpu_ms = launched.host_ms  # a CPU: the step ran inside the host call
        elif self.timing and launched.start is not None:
            rec.gpu_ms = launched.start.elapsed_time(launched.end)  # collected: `end` has passed
        if self.latency_model is not None and not launched.failed and step.kind != "mixed":
            self._update_model(rec)
        if self.step_log is not None:
            self.step_log.add(rec, launched.start, launched.end, launched.host_start_s)

    def _update_model(self, rec: StepRecord) -> None:
        """StepTimes.update with the step's GPU time (its events, around the launch) and the loop's cycle;
        the controller's cached predictions stay valid (nexus_tune/core/overhead.py says why)."""
        decode = rec.kind == "decode"
        size, kv = (rec.decode_seqs, rec.decode_kv) if decode else (rec.prefill_tokens, record_prefix(vars(rec)))
        beside = (rec.beside_prefill, rec.beside_prefill_kv) if decode else (0, 0)
        try:
            rec.predicted_ms = self.latency_model.update(rec.kind, size, kv, rec.sms, rec.gpu_ms, *beside,
                                                         cycle_ms=rec.cycle_ms, beside_decode=rec.beside_decode > 0)
        except ValueError as exc:  # e.g. a step too short to time: skip it
            log.debug("latency model update skipped: %s", exc)


# -- the loops -------------------------------------------------------------------------------------

@dataclass
class _Step:
    """A step in flight: the scheduler's batches, where they run, and the launch."""

    loop: str
    prefill: PrefillBatch | None
    decode: DecodeBatch | None
    sms: int
    sched_ms: float
    beside: tuple[int, int]  # two-loop decode: the prefill in flight at launch (tokens, prefix)
    launched: _Launch
    scheduled_s: float = 0.0  # when the loop asked for its batch (perf_counter)
    beside_decode: int = 0  # two-loop prefill: the sequences the decode loop ran at launch

    @property
    def kind(self) -> str:
        return "decode" if self.prefill is None else "prefill" if self.decode is None else "mixed"

    @property
    def followable(self) -> bool:
        """May the next step be scheduled before this one finished? Only after decode rows whose
        tokens are still on the device (not after a batch rerun one sequence at a time)."""
        return self.prefill is None and self.launched.tokens is None


class Loop(threading.Thread):
    """A thread that runs `step()` until the engine stops; sleeps on the scheduler when idle."""

    role = "loop"

    def __init__(self, ctx: LoopContext):
        super().__init__(name=f"nexus-{self.role}", daemon=True)
        self.ctx = ctx
        self.steps = StepRunner(ctx.runner, ctx.timing)
        self.inflight: _Step | None = None
        self._done_s = 0.0  # when the last step's bookkeeping ended (perf_counter)

    def run(self) -> None:
        # A new thread has no current CUDA context: bind it before the first launch (docs/gpu-facts.md).
        self.ctx.placement.table.bind_thread()
        with torch.inference_mode():
            try:
                while not self.ctx.stopping.is_set():
                    if not self.step():
                        self.ctx.scheduler.wait(IDLE_WAIT_S)
                self.drain()
            except BaseException as exc:  # noqa: BLE001 - a broken loop must not hang every request
                log.exception("the %s loop failed; stopping the engine", self.role)
                self.ctx.on_fatal(exc)

    def step(self) -> bool:
        """Schedule, launch, then finish the step before it; False if there was nothing to do."""
        if self.inflight is not None and not self.inflight.followable:
            self.drain()
        t0 = time.perf_counter()
        batch = self.schedule(t0)
        sched_ms = (time.perf_counter() - t0) * 1e3
        if batch is None:
            busy = self.inflight is not None
            self.drain()
            return busy
        self.ctx.note_split()
        previous, self.inflight = self.inflight, self.launch(batch, sched_ms)
        self.inflight.scheduled_s = t0
        if previous is not None:
            self.finish(previous)
        return True

    def drain(self) -> None:
        """Finish the step in flight, if any."""
        step, self.inflight = self.inflight, None
        if step is not None:
            self.finish(step)

    def schedule(self, now: float) -> Any:
        """The scheduler's next batch for this loop, or None."""
        raise NotImplementedError

    def launch(self, batch: Any, sched_ms: float) -> _Step:
        raise NotImplementedError

    def _launch(self, prefill: PrefillBatch | None, decode: DecodeBatch | None, sms: int, sched_ms: float,
                beside: tuple[int, int] = (0, 0), beside_decode: int = 0) -> _Step:
        """Decode rows first, then prompt chunks; a decode-only step replays the decode graphs."""
        place = self.ctx.placement
        rows = (_decode_rows(decode, self.steps.on_device) if decode else []) + \
            (_prefill_rows(prefill) if prefill else [])
        phase = "decode" if prefill is None else "prefill"
        key = place.key(sms) if place.cuda else None
        launched = self.steps.launch(rows, phase, place.stream(phase, sms), key)
        return _Step(self.role, prefill, decode, sms, sched_ms, beside, launched, beside_decode=beside_decode)

    def finish(self, step: _Step) -> None:
        """The step's tokens to the sink, its batches finished in the scheduler, its record."""
        ctx = self.ctx
        launched = self.steps.collect(step.launched)
        now = time.perf_counter()
        finished = ctx.finish_rows(launched, now)
        tokens = [t or 0 for t in launched.tokens]
        # Each part is finished with its own ids: the scheduler retires the ids it is given at once.
        n = len(step.decode.seqs) if step.decode else 0
        if step.decode is not None:
            ids = {s.seq_id for s in step.decode.seqs}
            ctx.scheduler.finish_decode(step.decode, now, tokens[:n], finished & ids, launched.end)
            finished -= ids
        if step.prefill is not None:
            ctx.scheduler.finish_prefill(step.prefill, now, tokens[n:], finished, launched.end)
        ctx.sink.flush()
        done = time.perf_counter()
        # Pipelined, this step was scheduled before the previous one ended: its cycle starts there.
        ctx.record(step, (done - max(step.scheduled_s, self._done_s)) * 1e3)
        self._done_s = done

    def _sms(self, batch: PrefillBatch | DecodeBatch) -> int:
        return batch.sms if batch.sms is not None else self.ctx.placement.total_sms  # None: the whole GPU


class PrefillLoop(Loop):
    """Two-loop policies: prompt chunks on the prefill side of the current split."""

    role = "prefill"

    def schedule(self, now: float) -> PrefillBatch | None:
        return self.ctx.scheduler.schedule_prefill(now)

    def launch(self, batch: PrefillBatch, sched_ms: float) -> _Step:
        self.ctx.prefill_load = (batch.num_tokens, batch.priced_prefix)
        return self._launch(batch, None, self._sms(batch), sched_ms, beside_decode=self.ctx.decode_load)

    def finish(self, step: _Step) -> None:
        try:
            super().finish(step)
        finally:
            self.ctx.prefill_load = (0, 0)


class DecodeLoop(Loop):
    """Two-loop policies: every decoding sequence, one token each, on the decode side of the split."""

    role = "decode"

    def schedule(self, now: float) -> DecodeBatch | None:
        batch = self.ctx.scheduler.schedule_decode(now)
        if batch is None:
            self.ctx.decode_load = 0
        return batch

    def launch(self, batch: DecodeBatch, sched_ms: float) -> _Step:
        self.ctx.decode_load = len(batch.seqs)
        return self._launch(None, batch, self._sms(batch), sched_ms, beside=self.ctx.prefill_load)


class MixedLoop(Loop):
    """`chunked` (vLLM v1): one forward per step holding decode tokens (1-token chunks) and prompt chunks;
    a step of decode tokens only replays the decode graphs, as vLLM runs a pure-decode step."""

    role = "mixed"

    def schedule(self, now: float) -> MixedBatch | None:
        return self.ctx.scheduler.schedule_mixed(now)

    def launch(self, batch: MixedBatch, sched_ms: float) -> _Step:
        return self._launch(batch.prefill, batch.decode, self.ctx.placement.total_sms, sched_ms)


class PrefillFirstLoop(Loop):
    """`prefill-first` (SGLang): a prefill batch whenever one is ready, a decode batch otherwise."""

    role = "single"

    def schedule(self, now: float) -> PrefillBatch | DecodeBatch | None:
        return self.ctx.scheduler.schedule_step(now)

    def launch(self, batch: PrefillBatch | DecodeBatch, sched_ms: float) -> _Step:
        if isinstance(batch, PrefillBatch):
            return self._launch(batch, None, self._sms(batch), sched_ms)
        return self._launch(None, batch, self._sms(batch), sched_ms)


def make_loops(ctx: LoopContext) -> list[Loop]:
    """The loop threads of the context's policy (not started)."""
    policy = ctx.scheduler.policy
    if ctx.scheduler.two_loops:
        return [PrefillLoop(ctx), DecodeLoop(ctx)]
    if policy == "chunked":
        return [MixedLoop(ctx)]
    return [PrefillFirstLoop(ctx)]
