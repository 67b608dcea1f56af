"""Every serving policy of the bundled engine on one fixed Mixed trace, on this GPU (issue #5).

    python benchmarks/engine_policies.py --out out/engine_policies [--profile PROFILE.json]

For each policy (nexus, chunked, prefill-first, static:N with N the split nearest half the GPU)
it builds the engine (llama-3.1-8b, random weights, decode CUDA graphs per split and bucket),
warms it up with a few greedy probe prompts, replays the same trace through `AsyncLLM` at a
fixed rate, and checks the run: every request finished with its token count, every KV block
came back. From the step log (CUDA events on each loop's stream) it reports:
- TTFT and TBT (inter-token gaps) p50/p99, TPOT, throughput, split switches, preemptions;
- time in the scheduler per step and in the controller per decision (nexus);
- two-loop policies: a decode step beside a running prefill (GPU intervals overlapping >= 90%)
  over a decode step with none (target <= 1.4x under nexus), per batch bucket, weighted;
- chunked: its mixed steps (decode rows riding with prompt chunks) over its pure decode steps
  (GPU-FACTS.md measured 7.7x for one 128-row + 2048-token pair).
The greedy probes are compared across policies (bf16 numerics differ with batch composition,
so this is reported, not asserted). nexus needs a profile: --profile, else the default
profiles/<gpu>/<model>.json, else a quick one is measured here (--no-profiling: skip nexus).
Writes results.json and results.md under --out and prints a short table last.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from engine.llm import AsyncLLM, EngineError, load_profile
from engine.loader import resolve_config
from engine.loops import StepRecord
from engine.model_runner import DEFAULT_BUCKETS
from nexus_tune import metrics
from nexus_tune.partition import SplitTable
from nexus_tune.sequence import SamplingParams
from nexus_tune.workload import TraceRequest, make_trace

console = Console()
PROBE_LENS = (16, 300, 2100, 5000)  # warm-up too: Triton compiles the prefill shapes it meets here
PROBE_TOKENS = 16
OVERLAP_BESIDE = 0.9  # a decode step counts as "beside a prefill" when prefill covers this share of it
MIN_GROUP = 3  # steps per bucket and group before a ratio is taken


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--policies", default="nexus,chunked,prefill-first,static:auto",
                   help="comma-separated; static:auto = the split nearest half the GPU")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--request-rate", type=float, default=1.5, help="requests per second (Poisson)")
    p.add_argument("--max-output", type=int, default=256, help="cap on each request's output tokens")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", help="profile JSON for nexus (default: profiles/<gpu>/<model>.json)")
    p.add_argument("--no-profiling", action="store_true", help="skip nexus instead of measuring a quick profile")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    return p.parse_args()


# -- setup --------------------------------------------------------------------------------------

def nexus_profile(args: argparse.Namespace, out: Path) -> Any:
    """The profile nexus runs on, or None (nexus is skipped, with the reason printed)."""
    device = torch.device("cuda")
    try:
        return load_profile(args.profile, args.model, device)
    except EngineError as e:
        if args.profile or args.no_profiling:
            console.print(f"[yellow]skipping nexus: {e}[/]")
            return None
        console.print(f"no profile yet ({e}); measuring a quick one (about two minutes)")
    from nexus_tune.profile import ProfileError
    from nexus_tune.profiler import profile_model

    try:
        profile = profile_model(args.model, device.index or 0, quick=True, console=console)
    except ProfileError as e:
        console.print(f"[yellow]skipping nexus: cannot measure a profile here: {e}[/]")
        return None
    finally:
        release_gpu()
    path = profile.save(out / "profile.json")
    console.print(f"wrote {path}; pass --profile {path} to reuse it")
    return profile


def release_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def make_prompts(trace: list[TraceRequest], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, min(vocab, 32000), r.prompt_tokens).tolist() for r in trace]


# -- one policy ----------------------------------------------------------------------------------

def run_policy(policy: str, args: argparse.Namespace, profile: Any, trace: list[TraceRequest],
               prompts: list[list[int]], probes: list[list[int]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine = AsyncLLM(args.model, policy=policy, device="cuda", profile=profile if policy == "nexus" else None,
                      max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                      gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed, step_log=True)
    build_s = time.perf_counter() - t0
    decide_us = time_controller(engine)
    engine.start()
    try:
        probe_tokens = asyncio.run(run_probes(engine, probes))
        warm_steps = len(engine.core.step_records())
        switches_before = engine.stats()["split_switches"]
        decide_us.clear()
        records = asyncio.run(replay(engine, trace, prompts, args.max_output))
        steps = engine.core.step_records()[warm_steps:]
        stats = engine.stats()
        blocks_back = wait_for_blocks(engine)
    finally:
        engine.shutdown()
        graphs = str(getattr(engine.core, "graph_report", ""))
        num_blocks = engine.core.scheduler.bm.num_blocks
        del engine
        release_gpu()
    start = min(r.arrival_s for r in records)
    end = max((r.finish_s for r in records if r.finish_s is not None), default=start + 1e-9)
    summary = metrics.summarize(records, end - start)
    expected = [min(r.output_tokens, args.max_output) for r in trace]
    checks = {
        "all_completed": summary["completed"] == len(trace),
        "token_counts_match": all(r.output_tokens == n for r, n in zip(records, expected) if r.done),
        "kv_blocks_returned": blocks_back,
    }
    result = {
        "policy": policy, "build_s": round(build_s, 1), "graphs": graphs, "kv_blocks": num_blocks,
        "checks": checks, "summary": summary,
        "split_switches": stats["split_switches"] - switches_before, "preemptions": stats["num_preemptions"],
        "sched_us_per_step": _dist([s.sched_ms * 1e3 for s in steps]),
        "controller_us_per_decision": _dist(decide_us),
        "steps": step_counts(steps),
        "interference": interference(policy, steps),
        "probe_tokens": probe_tokens,
        "errors": sorted({r.error for r in records if r.error}),
    }
    console.print(f"{policy}: {summary['completed']}/{len(trace)} done in {end - start:.1f} s, "
                  f"checks {'ok' if all(checks.values()) else checks}")
    return result


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


async def replay(engine: AsyncLLM, trace: list[TraceRequest], prompts: list[list[int]],
                 max_output: int) -> list[metrics.RequestRecord]:
    t0 = time.perf_counter()

    async def one(req: TraceRequest, ids: list[int]) -> metrics.RequestRecord:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
        params = SamplingParams(max_tokens=min(req.output_tokens, max_output), temperature=0.0, ignore_eos=True)
        last = None
        async for out in engine.generate(req.request_id, ids, params):
            last = out
        return last.metrics

    return list(await asyncio.gather(*(one(r, p) for r, p in zip(trace, prompts))))


def wait_for_blocks(engine: AsyncLLM, timeout_s: float = 5.0) -> bool:
    total = engine.core.scheduler.bm.num_blocks
    deadline = time.monotonic() + timeout_s
    while engine.stats()["free_blocks"] != total:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- step analysis -------------------------------------------------------------------------------

def _dist(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"n": len(values), "mean": float(arr.mean()), "p50": float(np.median(arr)),
            "p99": float(np.percentile(arr, 99))}


def step_counts(steps: list[StepRecord]) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = {}
    for s in steps:
        by_kind.setdefault(s.kind, []).append(s.gpu_ms)
    return {kind: _dist(ms) for kind, ms in by_kind.items()}


def _bucket(batch: int) -> int:
    return next((b for b in DEFAULT_BUCKETS if b >= batch), batch)


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


def probe_agreement(results: list[dict[str, Any]]) -> None:
    """Share of probe prompts whose greedy tokens equal the first policy's, and of first tokens."""
    ref = results[0]["probe_tokens"]
    for r in results:
        toks = r["probe_tokens"]
        r["probe_agreement"] = {
            "vs": results[0]["policy"],
            "identical_prompts": sum(a == b for a, b in zip(toks, ref)) / len(ref),
            "first_tokens": sum(a[0] == b[0] for a, b in zip(toks, ref)) / len(ref),
        }


# -- report --------------------------------------------------------------------------------------

COLUMNS = ("policy", "done", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TBT p50", "TBT p99", "TPOT mean",
           "switches", "preempt", "sched us/step", "ctrl us/dec", "decode slowdown", "checks")


def row(r: dict[str, Any], n: int) -> list[str]:
    s = r["summary"]
    inter = r["interference"]
    ctrl = r["controller_us_per_decision"]
    return [r["policy"], f"{s['completed']}/{n}", f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.0f}",
            f"{s['median_ttft_ms']:.0f}", f"{s['p99_ttft_ms']:.0f}", f"{s['median_itl_ms']:.1f}",
            f"{s['p99_itl_ms']:.1f}", f"{s['mean_tpot_ms']:.1f}", str(r["split_switches"]), str(r["preemptions"]),
            f"{r['sched_us_per_step']['mean']:.0f}" if r["sched_us_per_step"] else "-",
            f"{ctrl['mean']:.0f} (p99 {ctrl['p99']:.0f})" if ctrl else "-",
            f"{inter['ratio']:.2f}x" if inter else "-",
            "ok" if all(r["checks"].values()) else "FAILED"]


def write_markdown(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    n = meta["num_prompts"]
    lines = [f"# Engine policies on {meta['gpu']}: {meta['model']}, Mixed trace",
             "",
             f"{n} requests at {meta['request_rate']} req/s (Poisson, seed {meta['seed']}), outputs capped at "
             f"{meta['max_output']} tokens, greedy, random weights. Latencies in ms; TBT = every gap between "
             "streamed tokens. Decode slowdown: nexus/static = decode step beside a running prefill over one "
             "alone; chunked = mixed step over pure decode step (per batch bucket, weighted).",
             "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r, n)) + " |" for r in results]
    lines += ["", "Per-bucket interference (median ms: with prefill / without):", ""]
    for r in results:
        inter = r["interference"]
        if inter:
            buckets = ", ".join(f"B<={b}: {v['slow_ms']:.2f}/{v['base_ms']:.2f} (n={v['n']})"
                                for b, v in inter["per_bucket"].items())
            lines.append(f"- {r['policy']} ({inter['what']}): {buckets}")
    lines += ["", "Greedy probes vs " + results[0]["policy"] + ": "
              + ", ".join(f"{r['policy']} {r['probe_agreement']['identical_prompts']:.0%} identical"
                          for r in results)]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        console.print("[red]error:[/] this benchmark needs an NVIDIA GPU (torch sees none)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with SplitTable(warn=False) as table:  # which splits this GPU allows (for static:auto)
        total, split_sms, backend = table.total_sms, table.split_sms, table.backend
    half = min(split_sms, key=lambda s: abs(s - total / 2))
    policies = [p.strip().replace("static:auto", f"static:{half}") for p in args.policies.split(",") if p.strip()]
    profile = nexus_profile(args, out) if "nexus" in policies else None
    if profile is None:
        policies = [p for p in policies if p != "nexus"]
    if not policies:
        console.print("[red]error:[/] no policy left to run")
        return 2

    trace = make_trace("mixed", args.num_prompts, args.request_rate, seed=args.seed)
    room = args.max_model_len - args.max_output
    trace = [TraceRequest(r.request_id, r.arrival_s, min(r.prompt_tokens, room), r.output_tokens) for r in trace]
    vocab = resolve_config(args.model).vocab_size
    prompts = make_prompts(trace, vocab, args.seed)
    probes = make_prompts([TraceRequest(f"p{i}", 0.0, n, PROBE_TOKENS) for i, n in enumerate(PROBE_LENS)],
                          vocab, args.seed + 1)
    console.print(f"{torch.cuda.get_device_name()} ({total} SMs, {backend}); {len(trace)} Mixed requests at "
                  f"{args.request_rate} req/s, {sum(r.prompt_tokens for r in trace)} prompt tokens; "
                  f"policies: {', '.join(policies)}")

    results = []
    for policy in policies:
        console.rule(policy)
        results.append(run_policy(policy, args, profile, trace, prompts, probes))
    probe_agreement(results)

    meta = {"gpu": torch.cuda.get_device_name(), "sm_count": total, "backend": backend, "model": args.model,
            "num_prompts": len(trace), "request_rate": args.request_rate, "max_output": args.max_output,
            "seed": args.seed, "torch": torch.__version__,
            "profile": None if profile is None else {"gpu": profile.gpu.get("name"), "created": profile.created,
                                                      "synthetic": profile.synthetic}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_markdown(out / "results.md", meta, results)

    table = Table(title=f"{meta['gpu']}: {args.model}, {len(trace)} Mixed requests at {args.request_rate} req/s")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "policy" else "right")
    for r in results:
        table.add_row(*row(r, len(trace)))
    console.print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    console.print(table)
    return 0 if all(all(r["checks"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
