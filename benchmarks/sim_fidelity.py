"""Simulator fidelity: replay the trace of a measured `engine_policies.py` run in the simulator.

    python benchmarks/sim_fidelity.py docs/results/engine/policies_run2.json [more runs...] \
        --profile profiles/h100-80gb-hbm3/llama-3.1-8b.json

Runs on the CPU. For every policy of every measured run it rebuilds the same trace (workload,
seed, rate, output cap: from the run's `meta`), simulates it on the profile, and prints the
measured and simulated p50 TTFT and mean TPOT with their ratio (target: within 15%).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nexus_tune.profile import Profile
from nexus_tune.simulate import simulate
from nexus_tune.workload import TraceRequest, make_trace

TOLERANCE = 0.15


def measured_trace(meta: dict, max_model_len: int) -> list[TraceRequest]:
    """The trace engine_policies.py replayed: prompts cut to leave room for the capped output."""
    trace = make_trace("mixed", meta["num_prompts"], meta["request_rate"], seed=meta["seed"])
    room = max_model_len - meta["max_output"]
    return [TraceRequest(r.request_id, r.arrival_s, min(r.prompt_tokens, room), min(r.output_tokens, meta["max_output"]))
            for r in trace]


def compare(run: dict, profile: Profile, max_model_len: int) -> list[dict]:
    trace = measured_trace(run["meta"], max_model_len)
    rows = []
    for result in run["results"]:
        measured = result["summary"]
        simulated = simulate(profile, trace, result["policy"]).summary({})
        row = {"policy": result["policy"], "rate": run["meta"]["request_rate"]}
        for metric in ("median_ttft_ms", "mean_tpot_ms"):
            row[metric] = {"measured": measured[metric], "simulated": simulated[metric],
                           "ratio": simulated[metric] / measured[metric]}
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="results.json files written by benchmarks/engine_policies.py")
    p.add_argument("--profile", required=True)
    p.add_argument("--max-model-len", type=int, default=16384, help="as engine_policies.py ran")
    p.add_argument("--out", help="write the comparison as JSON here")
    args = p.parse_args()
    profile = Profile.load(args.profile)
    rows = [row for path in args.runs for row in compare(json.loads(Path(path).read_text()), profile,
                                                         args.max_model_len)]
    table = Table(title=f"simulated vs measured ({profile.gpu['name']}, {profile.model['name']})")
    for col in ("policy", "rate", "p50 TTFT meas.", "p50 TTFT sim.", "ratio", "mean TPOT meas.", "mean TPOT sim.",
                "ratio", f"within {TOLERANCE:.0%}"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        t, m = r["median_ttft_ms"], r["mean_tpot_ms"]
        ok = all(abs(x["ratio"] - 1) <= TOLERANCE for x in (t, m))
        table.add_row(r["policy"], f"{r['rate']:g}", f"{t['measured']:.1f}", f"{t['simulated']:.1f}",
                      f"{t['ratio']:.2f}", f"{m['measured']:.2f}", f"{m['simulated']:.2f}", f"{m['ratio']:.2f}",
                      "yes" if ok else "no")
    Console().print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
