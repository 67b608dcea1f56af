"""Replaying request traces through the in-process engine, and reading its step log.

Used by `nexus-tune calibrate` (short traces whose step logs fit the engine's step overhead),
benchmarks/engine_policies.py (one trace per policy) and benchmarks/paper_eval.py (a rate sweep
per policy).

    with PolicyEngine(model, policy, probes=probes, device="cuda", profile=...) as run:  # built once, warm
        result = run.replay(trace, prompts)          # one trace; again for the next rate
        result.summary(slos), result.steps, result.split_switches, result.checks(trace)

A replay can stop early: once more than 1 - metrics.ATTAINMENT_TARGET of its requests are
certain to miss the SLOs (the rate has failed whatever the rest do; they are aborted), or at a
deadline (a time budget). The engine keeps running for the next trace either way.
"""
from __future__ import annotations

import asyncio
import bisect
import gc
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from nexus_tune.engine.llm import AsyncLLM, EngineError, load_profile
from nexus_tune.engine.loops import StepRecord
from nexus_tune.engine.model_runner import DECODE_BUCKETS
from nexus_tune.core import metrics
from nexus_tune.core.profile import Profile
from nexus_tune.core.sequence import SamplingParams
from nexus_tune.core.workload import TraceRequest

PROBE_LENS = (16, 300, 2100, 5000)  # warm-up too: Triton compiles the prefill shapes it meets here
PROBE_TOKENS = 16
OVERLAP_BESIDE = 0.9  # a decode step counts as "beside a prefill" when prefill covers this share of it
MIN_GROUP = 3  # steps per bucket and group before a ratio is taken
WATCH_S = 0.05  # how often a replay with a stop condition looks at its requests
STOP_SLO, STOP_DEADLINE = "slo", "deadline"


# -- inputs --------------------------------------------------------------------------------------

def release_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_prompts(trace: list[TraceRequest], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 32000), r.prompt_tokens).tolist() for r in trace]


def probe_prompts(vocab: int, seed: int, max_model_len: int) -> list[list[int]]:
    """The warm-up prompts (greedy, PROBE_TOKENS each; their tokens are comparable across policies)."""
    lens = sorted({min(n, max_model_len - PROBE_TOKENS) for n in PROBE_LENS})
    return make_prompts([TraceRequest(f"p{i}", 0.0, n, PROBE_TOKENS) for i, n in enumerate(lens)], vocab, seed)


def capped_trace(trace: list[TraceRequest], max_model_len: int, max_output: int) -> list[TraceRequest]:
    """What the engine runs: outputs capped at `max_output`, prompts cut to leave them room."""
    room = max_model_len - max_output
    if room < 1:
        raise ValueError(f"max_model_len {max_model_len} leaves no room for prompts beside {max_output} output tokens")
    return [replace(r, prompt_tokens=min(r.prompt_tokens, room), output_tokens=min(r.output_tokens, max_output))
            for r in trace]


def load_or_measure_profile(model: str, path: str | None, out: Path, measure: bool, console: Console,
                 device: str = "cuda") -> Profile | None:
    """The profile of this GPU and model: `path`, else profiles/<gpu>/<model>.json, else (with `measure`)
    a quick one measured here and saved under `out`. None, with the reason printed, if there is none."""
    dev = torch.device(device)
    try:
        return load_profile(path, model, dev)
    except EngineError as e:
        if path or not measure or dev.type != "cuda":
            console.print(f"[yellow]no profile: {e}[/]")
            return None
        console.print(f"no profile yet ({e}); measuring a quick one (under a minute of sweep)")
    from nexus_tune.core.profile import ProfileError
    from nexus_tune.commands.profiler import profile_model

    try:
        profile = profile_model(model, dev.index or 0, quick=True, console=console)
    except ProfileError as e:
        console.print(f"[yellow]no profile: cannot measure one here: {e}[/]")
        return None
    finally:
        release_gpu()
    saved = profile.save(out / "profile.json")
    console.print(f"wrote {saved}; pass --profile {saved} to reuse it")
    return profile


# -- one engine, many traces ---------------------------------------------------------------------

@dataclass
class Replay:
    """One trace through a running engine: the records, the steps it took, and the engine's counters."""

    records: list[metrics.RequestRecord]
    steps: list[StepRecord]
    steps_origin_s: float  # perf_counter seconds of the steps' time zero (the records' clock)
    split_switches: int
    preemptions: int
    decide_us: list[float]  # controller decisions (nexus), microseconds each
    blocks_back: bool  # every KV block was free again afterwards
    stopped: str | None  # None, STOP_SLO (the rate failed; the rest were aborted) or STOP_DEADLINE
    wall_s: float

    @property
    def duration_s(self) -> float:
        start = min(r.arrival_s for r in self.records)
        end = max((r.finish_s for r in self.records if r.finish_s is not None), default=start)
        return max(end - start, 1e-9)

    def summary(self, slos: dict[str, float] | None = None) -> dict[str, Any]:
        return metrics.summarize(self.records, self.duration_s, slos)

    def checks(self, trace: list[TraceRequest]) -> dict[str, bool]:
        """Every request finished with its token count (the finished ones, after an early stop), every
        KV block came back."""
        checks = {
            "token_counts_match": all(r.output_tokens == t.output_tokens
                                      for r, t in zip(self.records, trace) if r.done),
            "kv_blocks_returned": self.blocks_back,
        }
        if self.stopped is None:
            checks = {"all_completed": all(r.done for r in self.records), **checks}
        return checks


class PolicyEngine:
    """One policy's engine (AsyncLLM with a step log), built once and warmed up with greedy probes."""

    def __init__(self, model: str, policy: str, probes: list[list[int]], **engine_kwargs: Any):
        t0 = time.perf_counter()
        self.policy = policy
        self.engine = AsyncLLM(model, policy=policy, step_log=True, **engine_kwargs)
        self.build_s = time.perf_counter() - t0
        self.graphs = "; ".join(map(str, getattr(self.engine.core, "graph_report", None) or []))
        self.kv_blocks = self.engine.core.scheduler.bm.num_blocks
        self.decide_us = time_controller(self.engine)
        self.engine.start()
        try:
            self.probe_tokens = asyncio.run(run_probes(self.engine, probes))
            wait_for_blocks(self.engine)
        except BaseException:
            self.close()
            raise

    def replay(self, trace: list[TraceRequest], prompts: list[list[int]], slos: dict[str, float] | None = None,
               deadline: float | None = None) -> Replay:
        """Send `trace` (arrival times from now; max_tokens = each request's output tokens, greedy). With
        `slos`, stop once the SLO attainment is certain to fall short; with `deadline` (perf_counter
        seconds), stop there."""
        core = self.engine.core
        first_step = len(core.step_records())
        before = self.engine.stats()
        self.decide_us.clear()
        t0 = time.perf_counter()
        records, stopped = asyncio.run(replay(self.engine, trace, prompts, slos, deadline))
        wall_s = time.perf_counter() - t0
        blocks_back = wait_for_blocks(self.engine)
        after = self.engine.stats()
        return Replay(records, core.step_records()[first_step:], core.step_origin_s(),
                      after["split_switches"] - before["split_switches"],
                      after["num_preemptions"] - before["num_preemptions"], list(self.decide_us), blocks_back,
                      stopped, wall_s)

    def close(self) -> None:
        self.engine.shutdown()
        release_gpu()

    def __enter__(self) -> PolicyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_controller(engine: AsyncLLM) -> list[float]:
    """Wrap the controller's decide() to time every decision (microseconds); [] without a controller."""
    samples: list[float] = []
    controller = engine.core.scheduler.controller
    if controller is None:
        return samples
    decide = controller.decide

    def timed(state):
        t = time.perf_counter_ns()
        split = decide(state)
        samples.append((time.perf_counter_ns() - t) / 1e3)
        return split

    controller.decide = timed
    return samples


async def run_probes(engine: AsyncLLM, probes: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=PROBE_TOKENS, temperature=0.0, ignore_eos=True)

    async def one(i: int, ids: list[int]) -> list[int]:
        return [out.token_id async for out in engine.generate(f"probe-{i}", ids, params)]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(probes))))


@dataclass
class _Progress:
    """A request as the client sees it while it streams (for the stop decision and partial records)."""

    request: TraceRequest
    sent_s: float
    token_times: list[float] = field(default_factory=list)
    record: metrics.RequestRecord | None = None  # the engine's, once finished

    def certain_miss(self, slos: dict[str, float], now: float) -> bool:
        """True if this request cannot meet the SLOs whatever happens next."""
        if self.record is not None:
            return not metrics.meets_slos(self.record, slos)
        waited_ms = (now - self.sent_s) * 1e3
        if "e2el" in slos and waited_ms > slos["e2el"]:
            return True
        if not self.token_times:
            return "ttft" in slos and waited_ms > slos["ttft"]
        n = self.request.output_tokens  # ignore_eos: it runs to exactly this many
        return "tpot" in slos and n > 1 and (now - self.token_times[0]) * 1e3 / (n - 1) > slos["tpot"]

    def partial_record(self, reason: str) -> metrics.RequestRecord:
        return metrics.RequestRecord(
            self.request.request_id, self.sent_s, self.request.prompt_tokens, len(self.token_times),
            self.token_times[0] if self.token_times else None, list(self.token_times),
            error=f"not finished: the replay stopped ({reason})")


async def replay(engine: AsyncLLM, trace: list[TraceRequest], prompts: list[list[int]],
                 slos: dict[str, float] | None = None,
                 deadline: float | None = None) -> tuple[list[metrics.RequestRecord], str | None]:
    """Records in trace order, and why the replay stopped early (None: it ran to the end)."""
    t0 = time.perf_counter()
    live: dict[str, _Progress] = {}

    async def one(req: TraceRequest, ids: list[int]) -> metrics.RequestRecord:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
        progress = live[req.request_id] = _Progress(req, time.perf_counter())
        params = SamplingParams(max_tokens=req.output_tokens, temperature=0.0, ignore_eos=True)
        last = None
        async for out in engine.generate(req.request_id, ids, params):
            progress.token_times.append(time.perf_counter())
            last = out
        progress.record = last.metrics
        return last.metrics

    tasks = [asyncio.create_task(one(r, p)) for r, p in zip(trace, prompts)]
    everything = asyncio.gather(*tasks, return_exceptions=True)  # errors surface below, from task.result()
    watching = bool(slos) or deadline is not None
    stopped = None
    while not everything.done():
        await asyncio.wait([everything], timeout=WATCH_S if watching else None)
        if not everything.done() and (stopped := _stop_reason(live, len(trace), slos, deadline)):
            for task in tasks:
                task.cancel()  # leaving engine.generate early aborts the request
            await everything
            break
    records = []
    for req, task in zip(trace, tasks):
        if not task.cancelled():
            records.append(task.result())
        elif req.request_id in live:
            records.append(live[req.request_id].partial_record(stopped))
        else:  # never sent
            records.append(metrics.RequestRecord(req.request_id, t0 + req.arrival_s, req.prompt_tokens,
                                                 error=f"not sent: the replay stopped ({stopped})"))
    return records, stopped


def _stop_reason(live: dict[str, _Progress], total: int, slos: dict[str, float] | None,
                 deadline: float | None) -> str | None:
    now = time.perf_counter()
    if deadline is not None and now >= deadline:
        return STOP_DEADLINE
    if slos:
        misses = sum(p.certain_miss(slos, now) for p in live.values())
        if misses > (1 - metrics.ATTAINMENT_TARGET) * total:
            return STOP_SLO
    return None


def wait_for_blocks(engine: AsyncLLM, timeout_s: float = 5.0) -> bool:
    total = engine.core.scheduler.bm.num_blocks
    deadline = time.monotonic() + timeout_s
    while engine.stats()["free_blocks"] != total:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- step analysis -------------------------------------------------------------------------------

def dist(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"n": len(values), "mean": float(arr.mean()), "p50": float(np.median(arr)),
            "p99": float(np.percentile(arr, 99))}


def step_counts(steps: list[StepRecord]) -> dict[str, Any]:
    """GPU ms per step, by step kind."""
    by_kind: dict[str, list[float]] = {}
    for s in steps:
        by_kind.setdefault(s.kind, []).append(s.gpu_ms)
    return {kind: dist(ms) for kind, ms in by_kind.items()}


def _bucket(batch: int) -> int:
    return next((b for b in DECODE_BUCKETS if b >= batch), batch)


def _ratio(slow: list[tuple[int, float]], base: list[tuple[int, float]]) -> dict[str, Any] | None:
    """Median step time of `slow` over `base` per batch bucket, combined as a geometric mean weighted
    by the number of `slow` steps in each bucket (buckets where either side has < MIN_GROUP steps drop)."""
    groups: dict[int, tuple[list[float], list[float]]] = {}
    for batch, ms in slow:
        groups.setdefault(_bucket(batch), ([], []))[0].append(ms)
    for batch, ms in base:
        groups.setdefault(_bucket(batch), ([], []))[1].append(ms)
    per_bucket = {b: (statistics.median(s), statistics.median(a), len(s))
                  for b, (s, a) in sorted(groups.items()) if len(s) >= MIN_GROUP and len(a) >= MIN_GROUP}
    if not per_bucket:
        return None
    weight = sum(n for _, _, n in per_bucket.values())
    ratio = math.exp(sum(n * math.log(s / a) for s, a, n in per_bucket.values()) / weight)
    return {"ratio": ratio, "steps": weight,
            "per_bucket": {str(b): {"slow_ms": s, "base_ms": a, "n": n} for b, (s, a, n) in per_bucket.items()}}


def interference(policy: str, steps: list[StepRecord]) -> dict[str, Any] | None:
    """How much slower a decode step is when prefill work shares the GPU with it."""
    decodes = [s for s in steps if s.kind == "decode"]
    if policy == "chunked":
        mixed = [(s.decode_seqs, s.gpu_ms) for s in steps if s.kind == "mixed"]
        result = _ratio(mixed, [(s.decode_seqs, s.gpu_ms) for s in decodes])
        return result and {"what": "mixed step / pure decode step", **result}
    if policy == "prefill-first":
        return None  # one step at a time: decode never shares the GPU
    prefills = sorted((s.start_ms, s.end_ms) for s in steps if s.kind == "prefill")
    starts, ends = [a for a, _ in prefills], [b for _, b in prefills]
    beside, alone = [], []
    for d in decodes:
        covered, i = 0.0, bisect.bisect_right(ends, d.start_ms)  # prefills (one stream: disjoint) ending after d starts
        while i < len(starts) and starts[i] < d.end_ms:
            covered += min(d.end_ms, ends[i]) - max(d.start_ms, starts[i])
            i += 1
        share = covered / max(d.end_ms - d.start_ms, 1e-9)
        if share >= OVERLAP_BESIDE:
            beside.append((d.decode_seqs, d.gpu_ms))
        elif share == 0:
            alone.append((d.decode_seqs, d.gpu_ms))
    result = _ratio(beside, alone)
    return result and {"what": "decode step beside a running prefill / decode step alone", **result}
