"""Issue 8, the paper's evaluation on this GPU: each policy's capacity under SLOs, from a rate sweep.

    PYTHONPATH=. python benchmarks/paper_eval.py --model llama-3.1-8b --workload mixed \
        --slo ttft=3000,tpot=50 --time-budget 520 --out out/paper/llama-mixed

Each policy (nexus, chunked, prefill-first, static:N; static:best = the static split with the
highest simulated capacity) gets ONE engine (AsyncLLM with a step log, random weights, the
controller knobs `plan` recommends, warmed up with greedy probes), which then replays Poisson (or, with
--burstiness below 1, burstier)
traces of the workload at rising rates. Every policy replays the same requests at a given rate
(one seed); a trace holds --num-prompts requests, more at high rates so that arrivals last
--min-duration seconds (a trace much shorter than the TTFT SLO is one burst, served before any
queue can grow). Per rate it keeps vLLM's serving metrics, the SLO attainment and which SLO the
misses broke, split switches, and the step log read several ways: GPU time per step kind,
measured over the profile's prediction (how far the simulator is off), decode slowdown beside
prefill, host time beyond GPU time, and the simulator's numbers for the same trace.

Rates: `auto` asks the simulator for each policy's capacity on the same trace (tune.find_capacity
on the profile) and climbs a ladder of fractions of it: 0.5, 0.75, 1, 1.25 for the two-loop
policies (the simulator is optimistic for them), 0.75, 1, 1.25 for the others. The first rate
that misses 90% attainment ends the climb (a replay stops as soon as more than 10% of its
requests are certain to miss: the rate has failed, the rest are aborted); --refine bisections
then narrow the bracket; a failing first rate is halved (twice at most); a ladder that never
fails climbs on by 1.25x (twice at most). chunked runs first and its measured capacity joins
nexus's rates: issue 8 compares their latencies there. A comma list runs those rates upward,
with the same stop.

Written under --out after every rate (a killed run keeps what it measured), one file per policy:
<model>__<workload>__<policy>.json. nexus's holds the split timeline of its run at its highest
passing rate; chunked's the efficiency of its mixed steps: GPU time over the roofline for their
rows (FLOPs at the bf16 matmul rate, bytes at the copy bandwidth, both measured at start) and over
the profile's whole-GPU prefill time for the same tokens.

It prints the wall-time estimate first (simulated durations with a margin, plus engine builds)
and, with --time-budget, the command for the policies the budget will not finish; it stops
cleanly inside the budget and prints that command again for what is left. --resume DIR counts
the results of an earlier call with the same setup (their rates are not run again). --dry-run
prints the plan and exits, without a GPU. benchmarks/paper_report.py turns the files into
docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nexus_tune.commands.replay import (STOP_DEADLINE, STOP_SLO, PolicyEngine, Replay, capped_trace, dist,
                                        interference, load_or_measure_profile, make_prompts, probe_prompts,
                                        release_gpu, step_counts)
from benchmarks.model_roofline import step_roofline_ms
from nexus_tune.engine.config import ModelConfig
from nexus_tune.engine.llm import EngineError
from nexus_tune.engine.loader import resolve_config
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.engine.loops import StepRecord
from nexus_tune.core import metrics
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.overhead import step_gpu_ms
from nexus_tune.commands.plan import recommended_knobs, static_policies, statics_beside
from nexus_tune.core.profile import Profile, model_slug
from nexus_tune.core.scheduler import parse_policy
from nexus_tune.core.simulator import simulate
from nexus_tune.commands.tune import CapacityProbe, parallel_map, rate_range, search_capacity
from nexus_tune.core.workload import TraceRequest, make_trace

console = Console()
WORKLOADS = ("mixed", "longdata", "arxiv", "sharegpt-synth")
DEFAULT_POLICIES = "chunked,nexus,prefill-first,static:best"
# Auto rates: fractions of the simulated capacity, climbed in order. The simulator is optimistic for
# the two-loop policies (TTFT 1.4-2.9x low, docs/performance.md), within 4-15% for the single-loop
# ones: the two-loop ladder starts lower.
LADDER = {"two-loop": (0.5, 0.75, 1.0, 1.25), "single-loop": (0.75, 1.0, 1.25)}
DOWN, MAX_DOWN = 0.5, 2  # a failing first rate is multiplied by DOWN, at most MAX_DOWN times
UP, MAX_UP = 1.25, 2  # a ladder that never fails climbs on by UP, at most MAX_UP times
REFINE_TOL = 0.1  # bisect a (pass, fail) bracket only while fail / pass exceeds 1 + this
# Wall-time estimate: the simulator's trace duration x margin + per-rate overhead, plus engine builds.
# From the H100 runs of engine_policies.py: nexus built in 17-19 s (180 decode graphs), the others
# in < 1 s; the first engine of a process also compiles the Triton kernels during its probes.
EST_MARGIN, EST_PER_RATE_S = 1.2, 3.0
EST_BUILD_S = {"nexus": 35.0, "static": 12.0}
EST_BUILD_OTHER_S, EST_FIRST_EXTRA_S, EST_SETUP_S = 10.0, 40.0, 15.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", help="preset (random weights) or checkpoint folder")
    p.add_argument("--workload", default="mixed", choices=WORKLOADS)
    p.add_argument("--slo", default="ttft=3000,tpot=50", help="ttft=MS,tpot=MS")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated: nexus, chunked, prefill-first, static:N, static:best")
    p.add_argument("--rates", default="auto", help="auto, or comma-separated requests per second")
    p.add_argument("--num-prompts", type=int, default=60, help="requests per rate (at least)")
    p.add_argument("--min-duration", type=float, default=12.0,
                   help="seconds of arrivals per rate: more requests at high rates")
    p.add_argument("--max-output", type=int, default=256, help="cap on each request's output tokens")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--refine", type=int, default=1, help="bisections of each auto bracket")
    p.add_argument("--no-early-stop", action="store_true",
                   help="replay failing rates to the end (slower; latencies of every request)")
    p.add_argument("--time-budget", type=float, help="seconds: run what fits, stop cleanly before")
    p.add_argument("--profile", help="profile JSON (default: profiles/<gpu>/<model>.json, else a quick one)")
    p.add_argument("--resume", help="a folder of earlier results of this setup: their rates count as run")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (tiny presets, tests)")
    p.add_argument("--save-steps", action="store_true",
                   help="keep every step record in the results (nexus-tune calibrate --from-runs fits them)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    args = p.parse_args(argv)
    if not 0 < args.burstiness < math.inf:
        p.error(f"--burstiness must be a positive, finite number, got {args.burstiness}")
    return args


def parse_rates(text: str) -> list[float] | None:
    """None for "auto", else the positive rates, ascending."""
    if text.strip() == "auto":
        return None
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"--rates {text!r}: expected auto or comma-separated rates, e.g. 2,3,4") from None
    if not rates or rates[0] <= 0 or not math.isfinite(rates[-1]):
        raise ValueError(f"--rates {text!r}: rates must be positive and finite")
    return rates


def parse_policies(text: str) -> list[str]:
    """Validated policy names, chunked first (its measured capacity joins nexus's rates)."""
    policies = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not policies:
        raise ValueError("--policies is empty")
    for p in policies:
        if p != "static:best":
            parse_policy(p)
    return sorted(policies, key=lambda p: p != "chunked")


def ladder_kind(policy: str) -> str:
    return "two-loop" if parse_policy(policy)[0] in ("nexus", "static") else "single-loop"


def round_rate(rate: float) -> float:
    return float(f"{rate:.3g}")


# -- which rates ----------------------------------------------------------------------------------

@dataclass
class Sweep:
    """The rates one policy runs, one at a time, from the outcomes so far (see the module docstring)."""

    ladder: list[float]  # ascending
    auto: bool  # extend below / above the ladder and bisect brackets
    refine: int = 1
    anchors: list[float] = field(default_factory=list)  # run whatever the outcomes
    passed: dict[float, bool] = field(default_factory=dict)
    downs: int = 0
    ups: int = 0
    refined: int = 0

    def record(self, rate: float, ok: bool) -> None:
        self.passed[rate] = ok

    def next(self) -> float | None:
        good = max((r for r, ok in self.passed.items() if ok), default=None)
        bad = min((r for r, ok in self.passed.items() if not ok), default=None)
        for rate in self.ladder:
            if rate not in self.passed and (bad is None or rate < bad) and (good is None or rate > good):
                return rate
        proposal = None
        if self.auto and good is None and bad is not None and self.downs < MAX_DOWN:
            self.downs += 1
            proposal = round_rate(bad * DOWN)
        elif self.auto and good is not None and bad is None and self.ups < MAX_UP:
            self.ups += 1
            proposal = round_rate(good * UP)
        elif (self.auto and good is not None and bad is not None and self.refined < self.refine
              and bad / good > 1 + REFINE_TOL):
            self.refined += 1
            proposal = round_rate(math.sqrt(good * bad))
        if proposal is not None and proposal not in self.passed:
            return proposal
        return next((r for r in self.anchors if r not in self.passed), None)

    def copy(self) -> Sweep:
        return replace(self, ladder=list(self.ladder), anchors=list(self.anchors), passed=dict(self.passed))


# -- the simulator's view -------------------------------------------------------------------------

def eval_trace(workload: str, rate: float, num_prompts: int, min_duration: float, seed: int, max_model_len: int,
               max_output: int, burstiness: float = 1.0) -> list[TraceRequest]:
    """The requests replayed at `rate`: at least `num_prompts`, and enough to arrive over `min_duration`
    seconds (a trace much shorter than the TTFT SLO is one burst, served before a queue can grow)."""
    n = max(num_prompts, math.ceil(rate * min_duration))
    return capped_trace(make_trace(workload, n, rate, burstiness, seed), max_model_len, max_output)


@dataclass
class CappedProbe(CapacityProbe):
    """tune.CapacityProbe on the trace the engine runs here (outputs capped, prompts cut to fit)."""

    max_model_len: int = 16384
    max_output: int = 256
    min_duration: float = 0.0

    def trace(self, rate: float) -> list[TraceRequest]:
        return eval_trace(self.workload, rate, self.num_prompts, self.min_duration, self.seed, self.max_model_len,
                          self.max_output, self.burstiness)

    def summary(self, rate: float) -> dict:
        if rate not in self.summaries:
            self.summaries[rate] = simulate(self.profile, self.trace(rate), self.policy, self.knobs).summary(self.slos)
        return self.summaries[rate]


def simulated_capacities(profile: Profile, args: argparse.Namespace, slos: dict[str, float], knobs: ControllerKnobs,
                         policies: list[str]) -> dict[str, tuple[float, CappedProbe]]:
    """{policy: (simulated capacity, its probe with every summary simulated so far)}, searched in parallel."""
    start, ceiling = rate_range(profile, args.workload, args.num_prompts, args.seed)
    probes = [CappedProbe(profile, args.workload, args.num_prompts, args.seed, slos, p, knobs,
                          max_model_len=args.max_model_len, max_output=args.max_output,
                          burstiness=args.burstiness, min_duration=args.min_duration) for p in policies]
    found = parallel_map(search_capacity, [(probe, start, 2.0, 10, 0.0, ceiling) for probe in probes])
    for probe, (_, summaries) in zip(probes, found):
        probe.summaries.update(summaries)  # the search ran on a copy in a worker process
    return {p: (cap, probe) for p, probe, (cap, _) in zip(policies, probes, found)}


def estimate_s(rates: list[float], probe: CappedProbe) -> float:
    return sum(probe.summary(r)["duration"] * EST_MARGIN + EST_PER_RATE_S for r in rates)


def build_estimate_s(policy: str, first: bool) -> float:
    name, _ = parse_policy(policy)
    return EST_BUILD_S.get(name, EST_BUILD_OTHER_S) + (EST_FIRST_EXTRA_S if first else 0.0)


def predicted_rates(sweep: Sweep, probe: CappedProbe) -> list[float]:
    """The rates the sweep would run if the GPU did what the simulator says."""
    sweep, rates = sweep.copy(), []
    while (rate := sweep.next()) is not None and len(rates) < 16:
        rates.append(rate)
        sweep.record(rate, probe(rate) >= metrics.ATTAINMENT_TARGET)
    return rates


# -- what one run's steps say ---------------------------------------------------------------------

def vs_profile(steps: list[StepRecord], model: LatencyModel) -> dict[str, Any]:
    """Measured GPU time over the profile's prediction, per step kind: what the simulator gets wrong."""
    ratios: dict[str, list[float]] = {}
    for s in steps:
        if not s.gpu_ms or s.failed or s.kind == "mixed":
            continue
        key = "decode beside prefill" if s.beside_prefill else s.kind
        ms = step_gpu_ms(model, s.kind, s.sms, s.prefill_tokens, s.prefill_kv, s.decode_seqs, s.decode_kv,
                         s.beside_prefill, s.beside_prefill_kv)
        ratios.setdefault(key, []).append(s.gpu_ms / ms)
    return {k: dist(v) for k, v in ratios.items()}


def loop_stats(steps: list[StepRecord]) -> dict[str, Any]:
    """Per loop: its steps, the share of its span its GPU work filled, and host time beyond GPU time per
    step (launches, sampling, scheduling: what a saturated loop loses to the host)."""
    by_loop: dict[str, list[StepRecord]] = {}
    for s in steps:
        by_loop.setdefault(s.loop, []).append(s)
    out = {}
    for loop, group in by_loop.items():
        span = max(s.end_ms for s in group) - min(s.start_ms for s in group)
        out[loop] = {"steps": len(group), "gpu_busy": sum(s.gpu_ms for s in group) / span if span > 0 else None,
                     "host_over_gpu_ms": dist([s.host_ms - s.gpu_ms for s in group])}
    return out


def split_timeline(rep: Replay, total_sms: int, points: int = 400) -> dict[str, Any]:
    """Prefill SMs of the split each step launched on, at every change (seconds from the first step),
    and, about `points` samples each, the decode batch and the queue (requests arrived and still
    without their first token) over time: what the split followed."""
    ordered = sorted(rep.steps, key=lambda s: s.start_ms)
    t0 = ordered[0].start_ms if ordered else 0.0
    splits: list[list[float]] = []
    for s in ordered:
        prefill_sms = s.sms if s.kind == "prefill" else total_sms - s.sms
        if not splits or splits[-1][1] != prefill_sms:
            splits.append([round((s.start_ms - t0) / 1e3, 4), prefill_sms])
    decodes = [s for s in ordered if s.kind == "decode"]
    batch = [[round((s.start_ms - t0) / 1e3, 4), s.decode_seqs] for s in decodes[::max(1, len(decodes) // points)]]
    arrivals = np.sort([r.arrival_s for r in rep.records])
    firsts = np.sort([r.first_token_s if r.first_token_s is not None else np.inf for r in rep.records])
    times = np.linspace(0, (ordered[-1].start_ms - t0) / 1e3 if ordered else 0.0, points)
    absolute = rep.steps_origin_s + t0 / 1e3 + times
    waiting = np.searchsorted(arrivals, absolute, side="right") - np.searchsorted(firsts, absolute, side="right")
    queue = [[round(float(t), 4), int(w)] for t, w in zip(times, waiting)]
    return {"total_sms": total_sms, "splits": splits, "decode_batch": batch, "queue": queue}


def slo_misses(records: list[metrics.RequestRecord], slos: dict[str, float]) -> dict[str, int]:
    """Requests that did not finish, and finished ones over each SLO (one request can miss several)."""
    done = [r for r in records if r.done]
    out = {"unfinished": len(records) - len(done)}
    for name, limit in slos.items():
        out[name] = sum(getattr(r, f"{name}_ms") > limit for r in done)
    return out


def chunked_efficiency(steps: list[StepRecord], config: ModelConfig, model: LatencyModel, total_sms: int,
                       ceilings: dict[str, float] | None) -> dict[str, Any] | None:
    """chunked's mixed steps (and, for reference, its prefill-only steps) against what their rows need."""
    mixed = [s for s in steps if s.kind == "mixed" and s.gpu_ms]
    if not mixed:
        return None
    prefill = [s for s in steps if s.kind == "prefill" and s.gpu_ms]
    out: dict[str, Any] = {
        "mixed_steps": len(mixed),
        "mixed_rows": dist([s.prefill_tokens + s.decode_seqs for s in mixed]),
        "mixed_vs_profile_prefill": dist([s.gpu_ms / model.predict_prefill(s.prefill_tokens + s.decode_seqs,
                                                                            s.prefill_kv, total_sms) for s in mixed]),
        "ceilings": ceilings,
    }
    if ceilings:
        rate, bw = ceilings["matmul_tflops"], ceilings["copy_gbps"]
        out["mixed_vs_roofline"] = dist([s.gpu_ms / step_roofline_ms(config, s, rate, bw) for s in mixed])
        out["prefill_vs_roofline"] = dist([s.gpu_ms / step_roofline_ms(config, s, rate, bw) for s in prefill])
    return out


# -- one policy's results -------------------------------------------------------------------------

@dataclass
class PolicyResult:
    """Everything written for one policy; rewritten after every rate."""

    policy: str
    requested: str  # as asked (static:best -> the static:N it resolved to)
    sim_capacity: float
    ladder: list[float]
    commands: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    split_timeline: dict[str, Any] | None = None
    chunked_efficiency: dict[str, Any] | None = None
    error: str | None = None

    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["stopped"] != STOP_DEADLINE]

    def capacity(self) -> float | None:
        return metrics.capacity({r["rate"]: r["summary"]["slo_attainment"] for r in self.complete()})

    def bracket(self) -> tuple[float | None, float | None]:
        """(highest passing rate, lowest failing rate above it)."""
        good = self.capacity()
        bad = min((r["rate"] for r in self.complete() if not r["passed"] and (good is None or r["rate"] > good)),
                  default=None)
        return good, bad

    def add_run(self, run: dict[str, Any], timeline: dict[str, Any] | None) -> None:
        self.runs = sorted([r for r in self.runs if r["rate"] != run["rate"]] + [run], key=lambda r: r["rate"])
        if timeline is not None:
            cur = self.split_timeline
            if cur is None or (run["passed"] and (not cur["passed"] or run["rate"] > cur["rate"])):
                self.split_timeline = {"rate": run["rate"], "passed": run["passed"], **timeline}

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        good, bad = self.bracket()
        return {"kind": "paper_eval", "meta": {**meta, "commands": self.commands}, "policy": self.policy,
                "requested": self.requested, "capacity": good, "first_failing_rate": bad,
                "simulated": {"capacity": self.sim_capacity, "ladder": self.ladder},
                "engine": self.engine, "runs": self.runs, "split_timeline": self.split_timeline,
                "chunked_efficiency": self.chunked_efficiency, "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PolicyResult:
        return cls(d["policy"], d["requested"], d["simulated"]["capacity"], d["simulated"]["ladder"],
                   list(d["meta"].get("commands", [])), d["runs"], d["engine"], d["split_timeline"],
                   d["chunked_efficiency"], d["error"])


def result_path(out: Path, model: str, workload: str, policy: str) -> Path:
    return out / f"{model_slug(model)}__{workload}__{policy.replace(':', '-')}.json"


def write_result(path: Path, result: PolicyResult, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_json(meta), indent=1))
    tmp.replace(path)  # whole files only, even when the run is killed mid-write


def load_resumed(folder: str | None, setup: dict[str, Any]) -> dict[str, PolicyResult]:
    """Earlier results of the same setup, by policy; files of another setup are named and skipped."""
    if not folder:
        return {}
    found = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or data.get("kind") != "paper_eval":
            continue
        if any(data["meta"].get(k) != v for k, v in setup.items()):
            console.print(f"[yellow]--resume: {path} is another setup; not used[/]")
            continue
        found[data["policy"]] = PolicyResult.from_json(data)
    return found


# -- running --------------------------------------------------------------------------------------

def run_summary(rate: float, rep: Replay, trace: list[TraceRequest], slos: dict[str, float], policy: str,
                profile: Profile, probe: CappedProbe) -> dict[str, Any]:
    summary = rep.summary(slos)
    sim = probe.summary(rate)
    return {
        "rate": rate, "date": datetime.now(UTC).isoformat(timespec="seconds"), "stopped": rep.stopped,
        "passed": rep.stopped != STOP_DEADLINE and summary["slo_attainment"] >= metrics.ATTAINMENT_TARGET,
        "wall_s": round(rep.wall_s, 1), "summary": summary, "slo_misses": slo_misses(rep.records, slos),
        "split_switches": rep.split_switches, "preemptions": rep.preemptions, "checks": rep.checks(trace),
        "errors": sorted({r.error for r in rep.records if r.error})[:5],
        "steps": step_counts(rep.steps), "sched_us_per_step": dist([s.sched_ms * 1e3 for s in rep.steps]),
        "controller_us_per_decision": dist(rep.decide_us), "interference": interference(policy, rep.steps),
        "vs_profile": vs_profile(rep.steps, profile.latency_model), "loops": loop_stats(rep.steps),
        "simulated": {k: sim[k] for k in ("slo_attainment", "duration", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
                                          "p99_itl_ms", "mean_tpot_ms")},
        # a stopped replay's summary covers only these requests (trace indices): sim_fidelity compares them
        **({"finished": [i for i, r in enumerate(rep.records) if r.done]} if rep.stopped else {}),
    }


@dataclass
class Context:
    """What every policy's run shares."""

    args: argparse.Namespace
    argv: list[str]
    slos: dict[str, float]
    knobs: ControllerKnobs
    profile: Profile
    config: ModelConfig
    meta: dict[str, Any]
    probes: list[list[int]]
    ceilings: dict[str, float] | None
    deadline: float | None

    def trace(self, rate: float) -> list[TraceRequest]:
        a = self.args
        return eval_trace(a.workload, rate, a.num_prompts, a.min_duration, a.seed, a.max_model_len, a.max_output,
                          a.burstiness)

    def left_s(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()


def run_policy(ctx: Context, result: PolicyResult, sweep: Sweep, probe: CappedProbe, path: Path,
               first: bool) -> bool:
    """Build the engine, replay rate after rate, write after each. False if the time budget stopped it."""
    a = ctx.args
    first_rate = sweep.copy().next()
    if first_rate is None:
        console.print(f"{result.policy}: every rate already measured")
        write_result(path, result, ctx.meta)  # this call's folder holds the whole setup too
        return True
    if build_estimate_s(result.policy, first) + estimate_s([first_rate], probe) > ctx.left_s():
        console.print(f"[yellow]{result.policy}: not started, the time budget is spent[/]")
        return False
    result.commands = list(dict.fromkeys([*result.commands, command_line(ctx.argv)]))
    nexus = result.policy == "nexus"
    try:
        pe = PolicyEngine(a.model, result.policy, ctx.probes, device=a.device,
                          profile=ctx.profile if nexus else None, knobs=ctx.knobs, max_num_seqs=a.max_num_seqs,
                          max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization, seed=a.seed)
    except EngineError as e:
        console.print(f"[red]{result.policy}: the engine cannot start: {e}[/]")
        result.error = str(e)
        write_result(path, result, ctx.meta)
        return True
    result.error = None
    chunked_steps: list[StepRecord] = []
    with pe:
        core = pe.engine.core
        total_sms = core.placement.total_sms
        result.engine = {"build_s": round(pe.build_s, 1), "graphs": pe.graphs, "kv_blocks": pe.kv_blocks,
                         "backend": core.table.backend, "total_sms": total_sms}
        console.print(f"{result.policy}: engine built in {pe.build_s:.1f} s; {pe.graphs}")
        while (rate := sweep.next()) is not None:
            if estimate_s([rate], probe) > ctx.left_s():
                console.print(f"[yellow]{result.policy}: stopping before {rate:g} req/s, the time budget is spent[/]")
                return False
            trace = ctx.trace(rate)
            prompts = make_prompts(trace, ctx.config.vocab_size, a.seed)
            rep = pe.replay(trace, prompts, None if a.no_early_stop else ctx.slos, ctx.deadline)
            run = run_summary(rate, rep, trace, ctx.slos, result.policy, ctx.profile, probe)
            if a.save_steps:
                run["step_records"] = [asdict(s) for s in rep.steps]
            result.add_run(run, split_timeline(rep, total_sms) if nexus else None)
            if result.policy == "chunked":
                chunked_steps += [s for s in rep.steps if s.kind in ("mixed", "prefill")]
                result.chunked_efficiency = chunked_efficiency(chunked_steps, ctx.config, ctx.profile.latency_model,
                                                               total_sms, ctx.ceilings) or result.chunked_efficiency
            write_result(path, result, ctx.meta)
            print_run(result.policy, run, len(trace))
            if rep.stopped == STOP_DEADLINE:
                return False
            sweep.record(rate, run["passed"])
    return True


def print_run(policy: str, run: dict[str, Any], n: int) -> None:
    s, m = run["summary"], run["slo_misses"]
    note = {None: "", STOP_SLO: " (stopped: >10% certain to miss)", STOP_DEADLINE: " (cut by the time budget)"}
    checks = "" if all(run["checks"].values()) else f" [red]checks {run['checks']}[/]"
    console.print(f"  {policy} @ {run['rate']:g} req/s: {'[green]pass[/]' if run['passed'] else '[red]fail[/]'} "
                  f"{s['slo_attainment']:.0%} met (misses: {m}), {s['completed']}/{n} done, "
                  f"TTFT mean {s['mean_ttft_ms']:.0f} ms, TBT p99 {s['p99_itl_ms']:.1f} ms, "
                  f"{run['wall_s']:.0f} s{note[run['stopped']]}{checks}")


def command_line(argv: list[str]) -> str:
    return "PYTHONPATH=. python benchmarks/paper_eval.py " + shlex.join(argv)


def follow_up(argv: list[str], policies: list[str], resume: str) -> list[str]:
    """`argv` for the policies left: the same setup, --resume from this run's results."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--policies", "--resume", "--dry-run"):
            skip = "=" not in arg and name != "--dry-run"
            continue
        out.append(arg)
    return [*out, "--policies", ",".join(policies), "--resume", resume]


def measure_ceilings(device: str) -> dict[str, float] | None:
    """The bf16 matmul rate and copy bandwidth of this GPU (model_roofline.py's), None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    from benchmarks.model_roofline import ceilings

    try:
        return ceilings()
    finally:
        release_gpu()


def make_meta(args: argparse.Namespace, slos: dict[str, float], profile: Profile, knobs: ControllerKnobs,
              ceilings: dict[str, float] | None) -> dict[str, Any]:
    cuda = torch.device(args.device).type == "cuda"
    return {
        "model": args.model, "workload": args.workload, "slos": slos, "num_prompts": args.num_prompts,
        "min_duration": args.min_duration, "max_output": args.max_output, "max_model_len": args.max_model_len,
        "seed": args.seed, "burstiness": args.burstiness, "max_num_seqs": args.max_num_seqs, "early_stop": not args.no_early_stop,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "sm_count": int(profile.gpu["sm_count"]), "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": {"gpu": profile.gpu.get("name"), "created": profile.created, "grid": profile.grid.get("name"),
                    "synthetic": profile.synthetic, "tuned_knobs": profile.tuned_knobs is not None,
                    "fit_error_mape_pct": {k: v.get("mape_pct") for k, v in profile.fit_error.items()}},
        "knobs": knobs.to_dict(), "ceilings": ceilings,
    }


def check_args(args: argparse.Namespace) -> tuple[dict[str, float], list[float] | None, list[str], ModelConfig]:
    """(SLOs, explicit rates or None, policies, model config); ValueError for bad input."""
    slos = metrics.parse_slos(args.slo)
    if not slos:
        raise ValueError("--slo is empty: give ttft=MS,tpot=MS")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--time-budget must be positive")
    return slos, parse_rates(args.rates), parse_policies(args.policies), resolve_config(args.model)


@dataclass
class Plan:
    """The policies to run (static:best resolved), in order, each with its sweep, result and simulator."""

    policies: list[str]
    sweeps: dict[str, Sweep]
    results: dict[str, PolicyResult]
    probes: dict[str, CappedProbe]
    chunked_cap: float | None  # measured, by an earlier call (--resume)


def make_plan(args: argparse.Namespace, profile: Profile, slos: dict[str, float], knobs: ControllerKnobs,
              rates: list[float] | None, requested: list[str]) -> Plan:
    statics = static_policies(profile) if "static:best" in requested else []
    asked = [p for p in requested if p != "static:best"]
    with console.status("simulating each policy's capacity ..."):
        sims = simulated_capacities(profile, args, slos, knobs, list(dict.fromkeys(asked + statics)))
    policies = list(asked)
    if statics:
        beside = statics_beside(profile, max(statics, key=lambda p: sims[p][0]), statics)
        with console.status("simulating the splits beside the best static ..."):
            sims.update(simulated_capacities(profile, args, slos, knobs, beside) if beside else {})
        best = max([*statics, *beside], key=lambda p: sims[p][0])
        policies += [] if best in policies else [best]
    setup = {"model": args.model, "workload": args.workload, "slos": slos, "num_prompts": args.num_prompts,
             "min_duration": args.min_duration, "max_output": args.max_output, "max_model_len": args.max_model_len,
             "seed": args.seed, "burstiness": args.burstiness}
    prior = load_resumed(args.resume, setup)
    sweeps, results = {}, {}
    for p in policies:
        cap = sims[p][0]
        base = cap or rate_range(profile, args.workload, args.num_prompts, args.seed)[0]
        ladder = rates or [round_rate(f * base) for f in LADDER[ladder_kind(p)]]
        sweeps[p] = Sweep(sorted(set(ladder)), rates is None, args.refine)
        requested_as = "static:best" if p in statics and p not in asked else p
        results[p] = prior.get(p) or PolicyResult(p, requested_as, cap, sweeps[p].ladder)
        for run in results[p].complete():
            sweeps[p].record(run["rate"], run["passed"])
    chunked_cap = prior["chunked"].capacity() if "chunked" in prior else None
    return Plan(policies, sweeps, results, {p: sims[p][1] for p in policies}, chunked_cap)


def print_plan(plan: Plan, args: argparse.Namespace, argv: list[str], title: str) -> None:
    """Each policy's rates as the simulator's outcomes would steer its sweep, the time they take, and
    the command for the policies the time budget will not finish."""
    anchor = plan.chunked_cap or (round_rate(plan.results["chunked"].sim_capacity) if "chunked" in plan.results
                                  else None)
    table = Table(title=title)
    for col in ("policy", "simulated capacity", "rates it should run (simulator's outcomes)", "est. s", "finishes"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    total, budget, later, first = EST_SETUP_S, args.time_budget, [], True
    for p in plan.policies:
        preview = plan.sweeps[p].copy()
        if p == "nexus" and anchor:
            preview.anchors = [anchor]
        rates = predicted_rates(preview, plan.probes[p])
        est = build_estimate_s(p, first) + estimate_s(rates, plan.probes[p]) if rates else 0.0
        first = first and not rates
        total += est
        fits = budget is None or total <= budget
        later += [] if fits else [p]
        table.add_row(p, f"{plan.results[p].sim_capacity:.3g}", ", ".join(f"{r:g}" for r in rates), f"{est:.0f}",
                      "yes" if fits else "no")
    console.print(table)
    console.print(f"estimated wall time: {total:.0f} s" + (f" (budget {budget:g} s)" if budget else ""))
    if later:
        command = command_line(follow_up(argv, later, args.out))
        console.print(f"[yellow]the time budget will stop this call before it finishes[/] {', '.join(later)}; "
                      f"afterwards run:\n  {escape(command)}", soft_wrap=True)


def final_table(results: list[PolicyResult]) -> Table:
    table = Table(title="Capacity under the SLOs (req/s; 90% of requests within every SLO)")
    for col in ("policy", "capacity", "first fail", "x chunked", "simulated", "rates run (x: failed)"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    base = next((r.capacity() for r in results if r.policy == "chunked"), None)
    for r in results:
        cap, bad = r.bracket()
        runs = ", ".join(f"{x['rate']:g}{'' if x['passed'] else 'x'}" for x in r.runs)
        table.add_row(r.policy, f"{cap:g}" if cap else "-", f"{bad:g}" if bad else "-",
                      f"{cap / base:.2f}x" if cap and base else "-", f"{r.sim_capacity:.3g}", runs or r.error or "-")
    return table


def run_all(ctx: Context, plan: Plan, out: Path) -> list[str]:
    """Every policy in order until the time budget stops one; returns the policies left."""
    chunked_cap = plan.chunked_cap
    for i, p in enumerate(plan.policies):
        if p == "nexus" and chunked_cap and chunked_cap not in plan.sweeps[p].anchors:
            plan.sweeps[p].anchors.append(chunked_cap)
        console.rule(p)
        path = result_path(out, ctx.args.model, ctx.args.workload, p)
        if not run_policy(ctx, plan.results[p], plan.sweeps[p], plan.probes[p], path, first=i == 0):
            return plan.policies[i:]
        if p == "chunked":
            chunked_cap = plan.results[p].capacity()
    return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        slos, rates, requested, config = check_args(args)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available() and not args.dry_run:
        console.print("[red]error:[/] no GPU here (torch sees none): run on the GPU, or --dry-run for the plan")
        return 2
    out = Path(args.out)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    # A quick profile is measured only for a real run on a GPU; a dry run without a GPU needs --profile.
    profile = load_or_measure_profile(args.model, args.profile, out, cuda and not args.dry_run, console, args.device)
    if profile is None:
        console.print("[red]error:[/] paper_eval needs the profile of this GPU and model (--profile FILE)")
        return 2
    knobs = recommended_knobs(profile, slos)
    plan = make_plan(args, profile, slos, knobs, rates, requested)
    print_plan(plan, args, argv, f"{args.model}, {args.workload}, {args.num_prompts}+ requests (>= "
               f"{args.min_duration:g} s of arrivals) per rate, SLOs "
               + ", ".join(f"{k} {v:g} ms" for k, v in slos.items()) + f"; nexus knobs: {knobs.mode} mode")
    if args.dry_run:
        return 0

    ceilings = measure_ceilings(args.device)
    if ceilings:
        console.print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
                      f"copy {ceilings['copy_gbps']:.0f} GB/s")
    ctx = Context(args, argv, slos, knobs, profile, config, make_meta(args, slos, profile, knobs, ceilings),
                  probe_prompts(config.vocab_size, args.seed + 1, args.max_model_len), ceilings,
                  None if args.time_budget is None else t_start + args.time_budget)
    left = run_all(ctx, plan, out)
    results = [plan.results[p] for p in plan.policies]
    console.print(final_table(results))
    if left:
        console.print(f"[yellow]the time budget stopped this call[/]; the rest (with this call's files in {out}):\n  "
                      + escape(command_line(follow_up(argv, left, args.out))), soft_wrap=True)
    console.print(f"results in {out}/ after {time.perf_counter() - t_start:.0f} s")
    return 1 if any(not all(r["checks"].values()) for res in results for r in res.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
