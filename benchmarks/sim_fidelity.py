"""Simulator fidelity: replay the traces of measured `paper_eval.py` runs in the simulator (issues 7, 17).

    PYTHONPATH=. python benchmarks/sim_fidelity.py docs/results/paper/llama-mixed \
        --profile profiles/h100-80gb-hbm3/llama-3.1-8b.json [--no-overhead] [--out fidelity.json]

Runs on the CPU. For every policy and rate of the given result folders it rebuilds the same trace
(workload, rate, arrivals, seed, lengths: from the run's `meta`), simulates it with the run's knobs
on the profile, and prints the measured and simulated p50 TTFT and mean TPOT with their ratio
(target: within 15%). A replay that stopped early (near capacity: more than 10% of requests were
certain to miss) is compared on the requests it finished, which its file lists; older files
without that list skip such runs. --no-overhead ignores the profile's step_overhead: the kernel-time-only
simulator, for comparison. --leave-one-out [DIR ...] scores out of sample: each run is simulated with
a step overhead fitted (as `nexus-tune calibrate --from-runs`) on the step records of every other run
of the folders and of the calibration folders DIR, never on its own:

    PYTHONPATH=. python benchmarks/sim_fidelity.py docs/results/h200/2026-12-01e/engine \
        --profile profiles/h200/llama-3.1-8b.json --leave-one-out docs/results/h200/2026-12-01e/calibration
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.paper_eval import eval_trace
from nexus_tune.commands.calibrate import calibrate, saved_results
from nexus_tune.core import metrics
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.profile import Profile
from nexus_tune.core.simulator import simulate

TOLERANCE = 0.15
MIN_STEPS = 30  # as `nexus-tune calibrate` (--min-steps)
METRICS = ("median_ttft_ms", "mean_tpot_ms")


def compare(result: dict, run: dict, profile: Profile) -> dict | None:
    """The row of one run of a paper_eval result file; None if it has nothing to compare."""
    meta = result["meta"]
    if run["stopped"] is not None and not run.get("finished"):
        return None  # a file from before the list of finished requests, or nothing finished
    trace = eval_trace(meta["workload"], run["rate"], meta["num_prompts"], meta["min_duration"], meta["seed"],
                       meta["max_model_len"], meta["max_output"], meta.get("burstiness", 1.0))
    sim = simulate(profile, trace, result["policy"], ControllerKnobs.from_dict(meta["knobs"]))
    records = [sim.records[i] for i in run["finished"]] if "finished" in run else sim.records
    simulated = metrics.summarize(records, sim.duration_s)
    row = {"model": meta["model"], "workload": meta["workload"], "policy": result["policy"], "rate": run["rate"],
           "compared": f"{len(records)} finished of {len(trace)}, stopped" if "finished" in run else "all"}
    for metric in METRICS:
        measured = run["summary"][metric]
        row[metric] = {"measured": measured, "simulated": simulated[metric], "ratio": simulated[metric] / measured}
    row["within"] = all(abs(row[m]["ratio"] - 1) <= TOLERANCE for m in METRICS)
    return row


def held_out(profile: Profile, logs: dict[tuple[str, int], list[dict]], leave: tuple[str, int],
             min_steps: int = MIN_STEPS) -> Profile:
    """The profile with its calibration (the prefill stretch beside a decode, then the step overhead)
    fitted on every step log but the run `leave` (file, run index)."""
    others = [log for key, log in logs.items() if key != leave]
    own = replace(profile, latency_model=LatencyModel.from_dict(profile.latency_model.to_dict()))
    return replace(own, step_overhead=calibrate(own, others, min_steps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="paper_eval.py result folders (.json or .json.gz)")
    p.add_argument("--profile", required=True)
    p.add_argument("--no-overhead", action="store_true", help="simulate kernel time only (ignore step_overhead)")
    p.add_argument("--leave-one-out", nargs="*", metavar="DIR",
                   help="simulate each run with the step overhead fitted on the step records of every OTHER run "
                        "(of the folders, and of these calibration folders): the score out of sample")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS,
                   help="with --leave-one-out: a step kind with fewer keeps the bare prediction")
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    if args.no_overhead:
        profile.step_overhead = None
    name = profile.model["name"]
    results = [(str(path), r) for path, r in saved_results(args.folders)
               if r["kind"] == "paper_eval" and r["meta"]["model"] == name]
    logs = {}
    if args.leave_one_out is not None:
        sources = results + [(str(path), r) for path, r in saved_results(args.leave_one_out) if r["meta"]["model"] == name]
        logs = {(path, i): run["step_records"] for path, r in sources for i, run in enumerate(r["runs"])
                if run.get("step_records")}
    rows = []
    for path, result in results:
        for i, run in enumerate(result["runs"]):
            row = compare(result, run, held_out(profile, logs, (path, i), args.min_steps) if logs else profile)
            if row is not None:
                rows.append(row)
    overhead = ("kernel time only" if profile.step_overhead is None else
                "step overhead fitted on the other runs" if logs else "with the engine's step overhead")
    table = Table(title=f"simulated vs measured: {profile.model['name']} on {profile.gpu['name']}, {overhead}")
    for col in ("workload", "policy", "rate", "requests", "p50 TTFT meas.", "sim.", "ratio", "mean TPOT meas.", "sim.", "ratio",
                f"within {TOLERANCE:.0%}"):
        table.add_column(col, justify="left" if col in ("workload", "policy") else "right")
    for r in rows:
        t, m = (r[k] for k in METRICS)
        table.add_row(r["workload"], r["policy"], f"{r['rate']:g}", r["compared"], f"{t['measured']:.0f}", f"{t['simulated']:.0f}",
                      f"{t['ratio']:.2f}", f"{m['measured']:.1f}", f"{m['simulated']:.1f}", f"{m['ratio']:.2f}",
                      "yes" if r["within"] else "no")
    console = Console()
    console.print(table)
    console.print(f"{sum(r['within'] for r in rows)} of {len(rows)} runs within {TOLERANCE:.0%} on both metrics")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
