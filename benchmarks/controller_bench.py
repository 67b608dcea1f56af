"""How long one controller decision takes (CPU only): median and p99 microseconds per mode.

The states follow a serving-like random walk (decode batch and KV drifting step to step, prefill
queue filling and draining, KV use crossing the 70% mode switch), so the prediction cache sees
what it sees in the engine. The controller plans as the engine's does
(`overhead.StepTimes`: the profile's curve under the online correction, plus its step overhead;
knobs derived from the profile). Three regimes:
- "online": what the engine does, an online update (a decode step's kernel time) before every
  decision; the cache holds uncorrected curves, so it stays valid;
- "warm": decisions alone;
- "cold": the cache cleared before every decision, the worst case (a refit every step).
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
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nexus_tune.core.controller import Controller, ControllerKnobs, StepState
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.overhead import StepTimes
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_profile

REGIMES = ("online", "warm", "cold")


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


def time_decisions(controller: Controller, states: list[StepState],
                   before: Callable[[StepState], None]) -> tuple[list[float], float]:
    """Microseconds per decision (`before` runs untimed ahead of each), and curve evaluations per decision."""
    times = []
    evaluations = controller.evaluations
    for s in states:
        before(s)
        t = time.perf_counter_ns()
        controller.decide(s)
        times.append((time.perf_counter_ns() - t) / 1e3)
    return times, (controller.evaluations - evaluations) / len(states)


def regime(name: str, controller: Controller) -> Callable[[StepState], None]:
    """What happens between two decisions."""
    times, total = controller.times, controller.total_sms

    def online(s: StepState) -> None:
        if s.decode_batch:
            sms = total - controller.current if 0 < controller.current < total else total
            kernel = times.model.predict_decode(s.decode_batch, s.decode_kv, sms)
            times.update("decode", s.decode_batch, s.decode_kv, sms, kernel * random.uniform(0.9, 1.2))

    return {"online": online, "warm": lambda s: None, "cold": lambda s: controller.clear_cache()}[name]


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
        for name in REGIMES:
            times = StepTimes(LatencyModel.from_dict(profile.latency_model.to_dict()), profile.step_overhead)
            knobs = ControllerKnobs.from_dict({**ControllerKnobs.for_profile(profile).to_dict(), "mode": mode})
            controller = Controller(times, profile.split_sms, total, knobs)
            between = regime(name, controller)
            time_decisions(controller, states[:500], between)  # warm the interpreter
            micros, evals = time_decisions(controller, states, between)
            q = statistics.quantiles(micros, n=100)
            rows.append({"mode": mode, "regime": name, "median_us": statistics.median(micros), "p99_us": q[98],
                         "evaluations_per_decision": evals})

    table = Table(title=f"controller decision time, {args.steps} serving-like steps ({profile.gpu['slug']})")
    for col in ("mode", "regime", "median us", "p99 us", "curve evals / decision"):
        table.add_column(col, justify="left" if col in ("mode", "regime") else "right")
    for r in rows:
        table.add_row(r["mode"], r["regime"], f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}",
                      f"{r['evaluations_per_decision']:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controller_bench.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
