"""Discrete-event simulator of the engine: the real scheduler and controller, step times from the model.

It drives `scheduler.Scheduler` exactly as the engine's loops do: the two-loop policies (nexus,
static:N) run a prefill loop and a decode loop side by side, each launching its next step as soon
as its previous one ends and the scheduler gives it a batch; the single-loop policies run one
step at a time on the whole GPU. Step durations come from the profile's `LatencyModel`:
- prefill batch: `predict_prefill(tokens, prefix tokens, sms)`, slowed when the decode loop runs beside it;
- decode batch: `predict_decode(batch, kv, sms)`, with the in-flight prefill's (tokens, prefix)
  as contention when one runs at launch time (the duration is fixed at launch);
- chunked's mixed batch: its tokens as one prefill on the whole GPU plus what the decode
  sequences' attention adds: `predict_prefill(P + B, KV_p) + predict_decode(B, KV_d) - predict_decode(B, 0)`.
The nexus controller plans with the same step times (`overhead.StepTimes`: the profile's curve
under the online correction, plus its StepOverhead) and, as in the engine, every finished
two-loop step's kernel time is fed back to it (`StepTimes.update`). With `gpu` (another latency
model: the GPU as it really is), steps take that model's times while the controller starts from
the profile's and learns the difference online, as the engine does.
Time convention (the engine's): a token is out when the step that sampled it ends. The first
token is sampled from the logits of the prefill's last chunk, so TTFT = arrival -> end of the
prefill step holding the last prompt chunk (queueing and earlier chunks included); every decode
step adds one token per sequence at its end. Requests stop at their trace output length.
KV capacity is the profile's `kv_capacity_tokens`, in blocks of `block_size`.
"""
from __future__ import annotations
import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from nexus_tune.core import metrics
from nexus_tune.core.block_manager import BlockManager
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.metrics import RequestRecord
from nexus_tune.core.overhead import StepTimes, step_gpu_ms
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.scheduler import DecodeBatch, MixedBatch, PrefillBatch, Scheduler
from nexus_tune.core.sequence import SamplingParams, Sequence
from nexus_tune.core.workload import TraceRequest
if TYPE_CHECKING:
    from nexus_tune.core.profile import Profile

_ARRIVAL, _PREFILL_DONE, _DECODE_DONE, _STEP_DONE = range(4)


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    duration_s: float  # first arrival to last finish (virtual seconds)
    split_switches: int = 0
    splits: list[tuple[float, int]] = field(default_factory=list)  # (time s, prefill SMs) at each change
    num_preemptions: int = 0

    def summary(self, slos: dict[str, float] | None = None) -> dict:
        """`metrics.summarize` of the records (vLLM's field names), plus the simulator's counters."""
        out = metrics.summarize(self.records, self.duration_s, slos)
        out.update(policy=self.policy, split_switches=self.split_switches, num_preemptions=self.num_preemptions)
        return out


def simulate(profile: Profile, trace: list[TraceRequest], policy: str, knobs: ControllerKnobs | None = None, *,
             max_num_seqs: int = EngineConfig.max_num_seqs, block_size: int = EngineConfig.block_size,
             mixed_token_budget: int = EngineConfig.mixed_token_budget,
             gpu: LatencyModel | None = None) -> SimResult:
    """Replay `trace` under `policy` (nexus | chunked | prefill-first | static:N) on `profile`.

    `knobs` default to ControllerKnobs.for_profile(profile): its tuned knobs, else derived ones.
    `gpu`: the kernel times steps really take, when they differ from the profile's (module docstring).
    """
    knobs = knobs or ControllerKnobs.for_profile(profile)
    return _Simulation(profile, trace, policy, knobs, max_num_seqs, block_size, mixed_token_budget, gpu).run()


class _Simulation:
    def __init__(self, profile: Profile, trace: list[TraceRequest], policy: str, knobs: ControllerKnobs,
                 max_num_seqs: int, block_size: int, mixed_token_budget: int, gpu: LatencyModel | None):
        self.model = gpu or profile.latency_model
        self.overhead = profile.step_overhead
        self.total_sms = int(profile.gpu["sm_count"])
        blocks = BlockManager(profile.kv_capacity_tokens // block_size, block_size)
        # The controller's own copy: its online correction must not leak into the profile.
        self.times = (StepTimes(LatencyModel.from_dict(profile.latency_model.to_dict()), self.overhead)
                      if policy == "nexus" else None)
        self.sched = Scheduler(policy, blocks, knobs, max_num_seqs=max_num_seqs, total_sms=self.total_sms,
                               split_sms=profile.split_sms, model=self.times,
                               mixed_token_budget=mixed_token_budget)
        self.policy = policy
        self.trace = trace
        self.records: dict[str, RequestRecord] = {}
        self.events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self.now = 0.0
        self.prefill_busy: PrefillBatch | None = None  # two-loop policies
        self.decode_busy = False
        self.gpu_busy = False  # single-loop policies
        self.splits: list[tuple[float, int]] = []

    def run(self) -> SimResult:
        for req in self.trace:
            self._push(req.arrival_s, _ARRIVAL, req)
        while self.events:
            self.now = self.events[0][0]
            while self.events and self.events[0][0] == self.now:  # everything at this instant, then launch
                _, _, kind, payload = heapq.heappop(self.events)
                self._handle(kind, payload)
            self._launch()
        if self.sched.num_unfinished:
            raise RuntimeError(f"simulation stalled at t={self.now:.3f}s with {self.sched.num_unfinished} "
                               f"unfinished requests: {self.sched.stats()}")
        records = [self.records[r.request_id] for r in self.trace]
        start = min((r.arrival_s for r in records), default=0.0)
        end = max((r.finish_s for r in records if r.finish_s is not None), default=start)
        return SimResult(self.policy, records, max(end - start, 1e-9), max(len(self.splits) - 1, 0),
                         self.splits, self.sched.num_preemptions)

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self._order), kind, payload))

    # -- events --------------------------------------------------------------------------------

    def _handle(self, kind: int, payload) -> None:
        if kind == _ARRIVAL:
            self._arrive(payload)
        elif kind == _PREFILL_DONE:
            self.prefill_busy = None
            self._observe(payload[1])
            self._finish_prefill(payload[0])
        elif kind == _DECODE_DONE:
            self.decode_busy = False
            self._observe(payload[1])
            self._finish_decode(payload[0])
        else:
            self.gpu_busy = False
            parts = [payload] if not isinstance(payload, MixedBatch) else [payload.decode, payload.prefill]
            for batch in parts:
                if isinstance(batch, DecodeBatch):
                    self._finish_decode(batch)
                elif isinstance(batch, PrefillBatch):
                    self._finish_prefill(batch)

    def _arrive(self, req: TraceRequest) -> None:
        record = self.records[req.request_id] = RequestRecord(req.request_id, req.arrival_s, req.prompt_tokens)
        try:
            params = SamplingParams(max_tokens=req.output_tokens, ignore_eos=True)
            self.sched.add(Sequence(req.request_id, [0] * req.prompt_tokens, params, req.arrival_s))
        except ValueError as e:  # e.g. it can never fit the KV cache: the engine answers with an error
            record.error = str(e)

    def _finish_prefill(self, batch: PrefillBatch) -> None:
        finished = []
        for seq, last in zip(batch.seqs, batch.last):
            if last:
                finished.extend(self._token_out(seq))
        self.sched.finish_prefill(batch, self.now, [0] * len(batch.seqs), finished)

    def _finish_decode(self, batch: DecodeBatch) -> None:
        finished = []
        for seq in batch.seqs:
            finished.extend(self._token_out(seq))
        self.sched.finish_decode(batch, self.now, [0] * len(batch.seqs), finished)

    def _token_out(self, seq: Sequence) -> list[str]:
        """Record the token `seq` gets at this instant; [its id] if that was its last one."""
        record = self.records[seq.seq_id]
        record.token_times_s.append(self.now)
        if record.first_token_s is None:
            record.first_token_s = self.now
        if seq.num_output_tokens + 1 < seq.params.max_tokens:
            return []
        record.output_tokens = seq.params.max_tokens
        record.finish_s = self.now
        record.success = True
        return [seq.seq_id]

    # -- launches ------------------------------------------------------------------------------

    def _launch(self) -> None:
        if self.sched.two_loops:
            self._launch_two_loops()
        elif not self.gpu_busy:
            self._launch_single_loop()
        if not self.splits or self.splits[-1][1] != self.sched.split:
            self.splits.append((self.now, self.sched.split))

    def _launch_two_loops(self) -> None:
        prefill = self.sched.schedule_prefill(self.now) if self.prefill_busy is None else None
        decode = self.sched.schedule_decode(self.now) if not self.decode_busy else None
        if prefill is not None:  # priced beside the decode that runs with it (one now, or one launched now)
            ms, seen = self._step_ms("prefill", prefill.sms, prefill=prefill,
                                     beside_decode=len(decode.seqs) if decode is not None else int(self.decode_busy))
            self.prefill_busy = prefill
            self._push(self.now + ms * 1e-3, _PREFILL_DONE, (prefill, seen))
        if decode is not None:
            ms, seen = self._step_ms("decode", decode.sms, decode=decode, beside=self.prefill_busy)
            self.decode_busy = True
            self._push(self.now + ms * 1e-3, _DECODE_DONE, (decode, seen))

    def _observe(self, seen: tuple) -> None:
        """What the engine's loops feed the controller after a step: its kernel time and its cycle."""
        if self.times is not None:
            *step, beside_decode, cycle_ms = seen
            self.times.update(*step, cycle_ms=cycle_ms, beside_decode=beside_decode > 0)

    def _launch_single_loop(self) -> None:
        if self.sched.policy == "chunked":
            batch = self.sched.schedule_mixed(self.now)
            ms = None if batch is None else self._step_ms("mixed", self.total_sms, batch.prefill, batch.decode)[0]
        else:
            batch = self.sched.schedule_step(self.now)
            if isinstance(batch, PrefillBatch):
                ms = self._step_ms("single", self.total_sms, prefill=batch)[0]
            elif batch is not None:
                ms = self._step_ms("single", self.total_sms, decode=batch)[0]
        if batch is not None:
            self.gpu_busy = True
            self._push(self.now + ms * 1e-3, _STEP_DONE, batch)

    def _step_ms(self, loop: str, sms: int, prefill: PrefillBatch | None = None, decode: DecodeBatch | None = None,
                 beside: PrefillBatch | None = None, beside_decode: int = 0) -> tuple[float, tuple]:
        """A step's time on `loop` (nexus_tune/engine/loops.py's names): the kernel time, plus the engine's
        overhead for that loop and step kind when the profile holds one; and the step as the
        engine reports it to the controller (StepTimes.update's arguments, then the decode sequences
        beside a prefill step, the cycle last). `beside`: the prefill beside a decode step;
        `beside_decode`: the sequences decoding beside a prefill step."""
        kind = "decode" if prefill is None else "prefill" if decode is None else "mixed"
        p_t, p_kv = (prefill.num_tokens, prefill.priced_prefix) if prefill is not None else (0, 0)
        d_n, d_kv = (len(decode.seqs), decode.kv_tokens) if decode is not None else (0, 0)
        b_t, b_kv = (beside.num_tokens, beside.priced_prefix) if beside is not None else (0, 0)
        gpu_ms = step_gpu_ms(self.model, kind, sms, p_t, p_kv, d_n, d_kv, b_t, b_kv, beside_decode)
        seqs = d_n + (len(prefill.seqs) if prefill is not None else 0)
        ms = gpu_ms if self.overhead is None else self.overhead.predict(f"{loop}/{kind}", gpu_ms, seqs)
        seen = (("prefill", p_t, p_kv, sms, gpu_ms, 0, 0) if kind == "prefill"
                else ("decode", d_n, d_kv, sms, gpu_ms, b_t, b_kv))
        return ms, (*seen, beside_decode, ms)
