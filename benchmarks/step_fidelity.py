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
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from nexus_tune.commands.calibrate import saved_step_logs
from nexus_tune.core.overhead import StepOverhead, fidelity_table, step_fidelity
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
    result = {"profile": args.profile, "files": files, "split": args.split, "kinds": fidelity(profile, logs, args.split)}
    out = Path(args.out) / f"step_fidelity_{profile.model['slug']}_{profile.gpu['slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    how = "fitted on the first half of every run, scored on the second" if args.split else "the profile's step overhead"
    Console(width=160).print(fidelity_table(result["kinds"], f"{profile.model['name']} on {profile.gpu['slug']}: "
                                                             f"engine steps, predicted against measured ({how})"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
