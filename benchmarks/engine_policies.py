"""Every serving policy of the bundled engine on one fixed Mixed trace, on this GPU (issue #5).

    PYTHONPATH=. python benchmarks/engine_policies.py --out out/engine_policies [--profile PROFILE.json]

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
  (docs/gpu-facts.md: 7.7x for one 128-row + 2048-token pair on the H100).
The greedy probes are compared across policies (bf16 numerics differ with batch composition,
so this is reported, not asserted). nexus needs a profile: --profile, else the default
profiles/<gpu>/<model>.json, else a quick one is measured here (--no-profiling: skip nexus).
Writes results.json and results.md under --out and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from nexus_tune.commands.replay import (PolicyEngine, capped_trace, dist, interference, load_or_measure_profile,
                                        make_prompts, probe_prompts, step_counts)
from nexus_tune.engine.loader import resolve_config
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.partition import SplitTable
from nexus_tune.core.workload import TraceRequest, make_trace

console = Console()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--policies", default="nexus,chunked,prefill-first,static:auto",
                   help="comma-separated; static:auto = the split nearest half the GPU")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--request-rate", type=float, default=1.5, help="requests per second (Poisson)")
    p.add_argument("--max-output", type=int, default=256, help="cap on each request's output tokens")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", help="profile JSON for nexus (default: profiles/<gpu>/<model>.json)")
    p.add_argument("--no-profiling", action="store_true", help="skip nexus instead of measuring a quick profile")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    return p.parse_args()


# -- one policy ----------------------------------------------------------------------------------

def run_policy(policy: str, args: argparse.Namespace, profile: Any, trace: list[TraceRequest],
               prompts: list[list[int]], probes: list[list[int]]) -> dict[str, Any]:
    with PolicyEngine(args.model, policy, probes, device="cuda", profile=profile if policy == "nexus" else None,
                      max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                      gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed) as run:
        result = run.replay(trace, prompts)
    summary = result.summary()
    checks = result.checks(trace)
    steps = result.steps
    out = {
        "policy": policy, "build_s": round(run.build_s, 1), "graphs": run.graphs, "kv_blocks": run.kv_blocks,
        "checks": checks, "summary": summary,
        "split_switches": result.split_switches, "preemptions": result.preemptions,
        "sched_us_per_step": dist([s.sched_ms * 1e3 for s in steps]),
        "controller_us_per_decision": dist(result.decide_us),
        "steps": step_counts(steps),
        "interference": interference(policy, steps),
        "probe_tokens": run.probe_tokens,
        "errors": sorted({r.error for r in result.records if r.error}),
    }
    console.print(f"{policy}: {summary['completed']}/{len(trace)} done in {result.duration_s:.1f} s, "
                  f"checks {'ok' if all(checks.values()) else checks}")
    return out


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
    profile = (load_or_measure_profile(args.model, args.profile, out, not args.no_profiling, console)
               if "nexus" in policies else None)
    if profile is None and "nexus" in policies:
        console.print("[yellow]skipping nexus[/] (it needs a profile)")
        policies = [p for p in policies if p != "nexus"]
    if not policies:
        console.print("[red]error:[/] no policy left to run")
        return 2

    trace = capped_trace(make_trace("mixed", args.num_prompts, args.request_rate, seed=args.seed),
                         args.max_model_len, args.max_output)
    vocab = resolve_config(args.model).vocab_size
    prompts = make_prompts(trace, vocab, args.seed)
    probes = probe_prompts(vocab, args.seed + 1, args.max_model_len)
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
