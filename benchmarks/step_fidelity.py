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
decode loop ran beside them (its steps covered over 80% of the prefill step) or not (under 20%): the
profile times prefill alone, so the ratio measured / predicted shows what a running decode costs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nexus_tune.commands.calibrate import saved_step_logs
from nexus_tune.core.overhead import StepOverhead, fidelity_table, predicted_gpu_ms, step_fidelity
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


def _covered(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    """Share of [start, end] that the spans cover (spans of one loop do not overlap)."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans) / max(end - start, 1e-9)


def prefill_beside_decode(profile: Profile, logs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (prefill SMs, decode loop beside or idle): steps and the median of GPU time over the profile's."""
    ratios: dict[tuple[int, str], list[float]] = defaultdict(list)
    for log in logs:
        timed = [r for r in log if r.get("gpu_ms") and r.get("start_ms") is not None and r.get("end_ms") is not None]
        decode = [(r["start_ms"], r["end_ms"]) for r in timed if r["loop"] == "decode"]
        for r in timed:
            if r["loop"] == "prefill" and r["kind"] == "prefill":
                covered = _covered(r["start_ms"], r["end_ms"], decode)
                if covered > 0.8 or covered < 0.2:
                    ratio = r["gpu_ms"] / predicted_gpu_ms(r, profile.latency_model)
                    ratios[r["sms"], "beside" if covered > 0.8 else "idle"].append(ratio)
    return [{"prefill_sms": sms, "decode_loop": state, "steps": len(v), "measured_over_profile": statistics.median(v)}
            for (sms, state), v in sorted(ratios.items())]


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
              "prefill_beside_decode": prefill_beside_decode(profile, logs)}
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
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
