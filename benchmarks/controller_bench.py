"""How long one controller decision takes (CPU only): median and p99 microseconds per mode.

The states follow a serving-like random walk (decode batch and KV drifting step to step, prefill
queue filling and draining, KV use crossing the 70% mode switch), so the prediction cache sees
what it sees in the engine. "cold" clears the cache before every decision: the worst case.
The target is a median under 100 microseconds.

    python benchmarks/controller_bench.py [--profile FILE] [--steps 20000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nexus_tune.controller import Controller, ControllerKnobs, StepState
from nexus_tune.profile import Profile, synthetic_profile


def serving_states(n: int, seed: int = 0) -> list[StepState]:
    rng = random.Random(seed)
    batch, context, queued, usage, wait = 32, 1500, 4096, 0.4, 0.0
    states = []
    for _ in range(n):
        batch = min(256, max(1, batch + rng.choice((-1, 0, 0, 1))))
        context = min(16_000, max(100, context + rng.randint(-40, 50)))
        queued = max(0, queued + rng.choice((-2048, 0, 0, 512, 1024, 6000)))
        usage = min(1.0, max(0.0, usage + rng.uniform(-0.01, 0.01)))
        wait = 0.0 if not queued else wait + rng.uniform(5.0, 15.0)
        chunk = min(queued, 2048)
        states.append(StepState(queued, chunk, rng.choice((0, 0, 2048, 4096)), batch, batch * context, usage, wait))
    return states


def time_decisions(controller: Controller, states: list[StepState], cold: bool) -> tuple[list[float], float]:
    """Microseconds per decision, and model evaluations per decision."""
    times = []
    evaluations = controller.evaluations
    for s in states:
        if cold:
            controller.clear_cache()
        t = time.perf_counter_ns()
        controller.decide(s)
        times.append((time.perf_counter_ns() - t) / 1e3)
    return times, (controller.evaluations - evaluations) / len(states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a profile JSON (default: the synthetic H100 / Llama-3.1-8B one)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()

    profile = Profile.load(args.profile) if args.profile else synthetic_profile()
    total = int(profile.gpu["sm_count"])
    states = serving_states(args.steps)
    rows = []
    for mode in ("paper", "slo"):
        for cold in (False, True):
            controller = Controller(profile.latency_model, profile.split_sms, total, ControllerKnobs(mode=mode))
            time_decisions(controller, states[:500], cold)  # warm the interpreter
            times, evals = time_decisions(controller, states, cold)
            q = statistics.quantiles(times, n=100)
            rows.append({"mode": mode, "cache": "cold" if cold else "warm", "median_us": statistics.median(times),
                         "p99_us": q[98], "evaluations_per_decision": evals})

    table = Table(title=f"controller decision time, {args.steps} serving-like steps ({profile.gpu['slug']})")
    for col in ("mode", "cache", "median us", "p99 us", "model evals / decision"):
        table.add_column(col, justify="left" if col in ("mode", "cache") else "right")
    for r in rows:
        table.add_row(r["mode"], r["cache"], f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}",
                      f"{r['evaluations_per_decision']:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controller_bench.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
