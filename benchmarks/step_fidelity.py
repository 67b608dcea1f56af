"""Engine-step fidelity: predicted against measured engine steps per step kind (issue 17).

    PYTHONPATH=. python benchmarks/step_fidelity.py --profile profiles/h200/llama-3.1-8b.json \
        --runs docs/results/h200/calibration [--split] [--out DIR]

Runs on the CPU, on the step records `nexus-tune calibrate` saved (or paper_eval.py --save-steps).
Per step kind ("<loop>/<kind>"): the latency model's kernel time against each step's GPU time, and
the step overhead's cycle against the loop's measured cycle (what the simulator runs on): median
and p90 of |error| and the share within 8% (core/overhead.py `step_fidelity`, which `calibrate`
prints too). Without --split, the profile's stored step_overhead is scored on all the steps (for
runs it was fitted on: in sample, as `calibrate` reports). With --split, a StepOverhead is fitted
on the first half of every run's steps and scored on the second half, which it never saw.

A second table splits the two-loop policies' prefill steps by their side's SMs and by whether the
decode loop ran beside them (core/overhead.py `prefill_slowdowns`): the profile times prefill alone, so
the ratio measured / predicted alone shows what a running decode costs it. A third gives, per step kind,
the loop's cycle beyond the step's GPU span, measured directly (StepOverhead's fixed term is a fit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rich.console import Console
from rich.table import Table

from nexus_tune.commands.calibrate import saved_step_logs
from nexus_tune.core.overhead import (StepOverhead, fidelity_table, prefill_slowdowns, step_cycles, step_fidelity,
                                      step_key)
from nexus_tune.core.profile import Profile

MIN_STEPS = 30  # as `nexus-tune calibrate` (--min-steps): a step kind with fewer keeps the bare prediction


def halves(log: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's steps before and after its middle instant (each half keeps one clock, as a run does)."""
    timed = sorted((r for r in log if r.get("start_ms") is not None), key=lambda r: r["start_ms"])
    if not timed:
        return [], []
    middle = (timed[0]["start_ms"] + timed[-1]["start_ms"]) / 2
    return [r for r in timed if r["start_ms"] < middle], [r for r in timed if r["start_ms"] >= middle]


def fidelity(profile: Profile, logs: list[list[dict[str, Any]]], split: bool) -> dict[str, Any]:
    if not split:
        return step_fidelity(logs, profile.latency_model, profile.step_overhead)
    first, second = zip(*map(halves, logs))
    overhead = StepOverhead().fit(first, profile.latency_model, MIN_STEPS // 2)  # half the steps, half the floor
    return step_fidelity(second, profile.latency_model, overhead)


def prefill_beside_decode(profile: Profile, logs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (prefill SMs, decode loop beside or idle): steps and the median of GPU time over the profile's
    prefill alone."""
    ratios: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r, slowdown in prefill_slowdowns(logs, profile.latency_model):
        ratios[r["sms"], "beside" if r.get("beside_decode") else "idle"].append(slowdown)
    return [{"prefill_sms": sms, "decode_loop": state, "steps": len(v), "measured_over_profile": statistics.median(v)}
            for (sms, state), v in sorted(ratios.items())]


def host_per_step(logs: list[list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per step key: median and p90 of a loop's cycle less the step's GPU span (ms): what a step costs
    the loop beyond its kernels, measured directly rather than through StepOverhead's fit."""
    beyond: dict[str, list[float]] = defaultdict(list)
    for r, cycle in step_cycles(logs):
        beyond[step_key(r["loop"], r["kind"])].append(cycle - r["gpu_ms"])
    return {key: {"steps": len(v), "median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90))}
            for key, v in sorted(beyond.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="folders of saved step records")
    ap.add_argument("--split", action="store_true", help="fit on the first half of every run, score the second")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    profile = Profile.load(args.profile)
    logs, files = saved_step_logs(args.runs, profile.model["name"])
    if not logs:
        raise SystemExit(f"no step records of {profile.model['name']} under {', '.join(args.runs)}")
    result = {"profile": args.profile, "files": files, "split": args.split, "kinds": fidelity(profile, logs, args.split),
              "prefill_beside_decode": prefill_beside_decode(profile, logs), "host_per_step": host_per_step(logs)}
    out = Path(args.out) / f"step_fidelity_{profile.model['slug']}_{profile.gpu['slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    how = "fitted on the first half of every run, scored on the second" if args.split else "the profile's step overhead"
    console = Console(width=160)
    console.print(fidelity_table(result["kinds"], f"{profile.model['name']} on {profile.gpu['slug']}: "
                                                  f"engine steps, predicted against measured ({how})"))
    table = Table(title="two-loop prefill steps: GPU time over the profile's (which times prefill alone)")
    for col in ("prefill SMs", "decode loop", "steps", "measured / profile (median)"):
        table.add_column(col, justify="right")
    for row in result["prefill_beside_decode"]:
        table.add_row(str(row["prefill_sms"]), row["decode_loop"], str(row["steps"]), f"{row['measured_over_profile']:.3f}")
    console.print(table)
    table = Table(title="a loop's cycle beyond its step's GPU span (host work and gap to the next step), ms")
    for col in ("loop/kind", "steps", "median", "p90"):
        table.add_column(col, justify="right")
    for key, row in result["host_per_step"].items():
        table.add_row(key, str(row["steps"]), f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}")
    console.print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
