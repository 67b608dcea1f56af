"""Capacity under SLOs by issue 13's methodology, on the simulator (CPU) or the engine (GPU).

    PYTHONPATH=. python benchmarks/capacity.py                                   # simulator, every setup
    PYTHONPATH=. python benchmarks/capacity.py --setups llama-mixed --seeds 0    # one setup, quicker
    PYTHONPATH=. python benchmarks/capacity.py --backend engine --setups llama-mixed \
        --profile profiles/<gpu>/llama-3.1-8b.json --statics 96 --rel-tol 0.1 --max-evals 5 \
        --out out/capacity                                                       # on the GPU

Capacity = the highest arrival rate at which >= 90% of requests meet both SLOs (TTFT and TPOT). A
rate replays at least --num-prompts requests and at least --min-duration seconds of arrivals;
every capacity is searched (tune.find_capacity: a ladder, then bisection to --rel-tol) for each
of --seeds, under Poisson arrivals and bursty ones (gamma gaps, burstiness 0.5); a cell shows the
mean over seeds, the spread (lowest-highest seed) and, per seed, the bracket (highest passing
rate, lowest failing one) lands in the JSON. Columns, all on the same engine and knobs except
what they name:
- nexus: untuned, the knobs ControllerKnobs.for_profile derives from the profile and the SLOs;
- tuned: the profile's tuned knobs, or (none in the profile, or --retune) a `tune` run of
  --tune-trials trials on Poisson arrivals of seed 0;
- best static: the static split with the highest mean capacity, chosen with hindsight per setup
  and arrival pattern among --statics (default: every split from a quarter to 90% of the GPU's
  SMs, thinned to STATIC_CANDIDATES, then the splits beside the best of those; the engine
  backend runs the simulator's pick only);
- chunked (vLLM v1) and prefill-first (SGLang).
The table and `capacity.json` go to --out. The engine backend builds one engine per policy
(random weights, the setup's model unless --model), starts each search at the simulator's capacity
for it, and replays every rate through the engine with the early stop of nexus_tune.replay (a
rate fails as soon as more than 10% of requests are certain to miss): a rate costs a minute or
more, so a full grid takes hours; name fewer setups, seeds or columns, and widen --rel-tol.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nexus_tune.core import metrics
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.simulator import simulate
from nexus_tune.commands.tune import find_capacity, parallel_map, rate_range, tune
from nexus_tune.core.workload import TraceRequest, make_trace

console = Console(width=240)  # the table's ten columns on one line
ARRIVALS = {"poisson": 1.0, "bursty": 0.5}  # gamma shape of the inter-arrival gaps
STATIC_CANDIDATES = 6
SEARCH_STEP = 1.5  # the ladder's factor before bisection


@dataclass(frozen=True)
class Setup:
    """A model and GPU (a profile file, or synthetic_profile's arguments), a workload and its SLOs."""

    profile: str | dict[str, Any]
    workload: str
    slo: str
    model: str = "llama-3.1-8b"  # the engine backend's preset

    def load(self, path: str | None = None) -> Profile:
        if path or isinstance(self.profile, str):
            return Profile.load(path or self.profile)
        return synthetic_profile(**self.profile)


SETUPS = {
    "llama-mixed": Setup("profiles/h200/llama-3.1-8b.json", "mixed", "ttft=3000,tpot=50"),
    "qwen-longdata": Setup("profiles/h200/qwen2.5-3b.json", "longdata", "ttft=3000,tpot=30", "qwen2.5-3b"),
    # Two GPUs the repository has no profile of: the H100-like synthetic truth, and a slower one
    # with fewer SMs, a finer split granularity and less KV memory.
    "synthetic-132sm": Setup({"total_sms": 132, "granularity": 8}, "mixed", "ttft=3000,tpot=50"),
    "synthetic-108sm": Setup({"total_sms": 108, "granularity": 4, "scale": 1.6, "kv_capacity_tokens": 250_000},
                             "mixed", "ttft=3000,tpot=50"),
}


@dataclass
class Method:
    """How a rate is judged and a capacity searched."""

    num_prompts: int = 400
    min_duration: float = 60.0
    seeds: tuple[int, ...] = (0, 1, 2)
    rel_tol: float = 0.03
    max_evals: int = 12

    def trace(self, workload: str, rate: float, burstiness: float, seed: int) -> list[TraceRequest]:
        n = max(self.num_prompts, math.ceil(rate * self.min_duration))
        return make_trace(workload, n, rate, burstiness, seed)


@dataclass
class Search:
    """One capacity search: a policy, its knobs, one seed and arrival pattern."""

    column: str
    policy: str
    knobs: ControllerKnobs
    seed: int
    arrivals: str
    tried: dict[float, float] = field(default_factory=dict)  # rate -> SLO attainment
    capacity: float = 0.0

    @property
    def bracket(self) -> tuple[float, float | None]:
        """(highest passing rate, lowest failing rate above it)."""
        fails = [r for r, a in self.tried.items() if a < metrics.ATTAINMENT_TARGET and r > self.capacity]
        return self.capacity, min(fails, default=None)


def simulated(profile: Profile, workload: str, slos: dict[str, float], method: Method,
              search: Search, start: float, ceiling: float) -> Search:
    """Run `search` on the simulator (a process-pool job)."""
    def attainment(rate: float) -> float:
        trace = method.trace(workload, rate, ARRIVALS[search.arrivals], search.seed)
        return simulate(profile, trace, search.policy, search.knobs).summary(slos)["slo_attainment"]

    search.capacity, search.tried = find_capacity(attainment, start, SEARCH_STEP, method.rel_tol, method.max_evals,
                                                  max_rate=ceiling)
    return search


def on_engine(profile: Profile, setup: Setup, slos: dict[str, float], method: Method, searches: list[Search],
              starts: list[float], args: argparse.Namespace) -> list[Search]:
    """Run `searches` on the GPU, each from its rate in `starts`: one warm engine per policy, every
    rate replayed through it."""
    from nexus_tune.engine.loader import resolve_config
    from nexus_tune.commands.replay import PolicyEngine, capped_trace, make_prompts, probe_prompts

    model = args.model or setup.model
    config = resolve_config(model)
    probes = probe_prompts(config.vocab_size, 1, args.max_model_len)
    for column in dict.fromkeys(s.column for s in searches):
        mine = [s for s in searches if s.column == column]
        nexus = mine[0].policy == "nexus"
        with PolicyEngine(model, mine[0].policy, probes, device=args.device, profile=profile if nexus else None,
                          knobs=mine[0].knobs, max_model_len=args.max_model_len) as engine:
            console.print(f"{column}: engine built in {engine.build_s:.0f} s")
            for search in mine:
                start = starts[searches.index(search)]

                def attainment(rate: float, s: Search = search) -> float:
                    trace = capped_trace(method.trace(setup.workload, rate, ARRIVALS[s.arrivals], s.seed),
                                         args.max_model_len, args.max_output)
                    run = engine.replay(trace, make_prompts(trace, config.vocab_size, s.seed), slos)
                    attained = run.summary(slos)["slo_attainment"]
                    console.print(f"  {column} {s.arrivals} seed {s.seed} @ {rate:.3g} req/s: {attained:.0%}")
                    return attained

                search.capacity, search.tried = find_capacity(attainment, start, SEARCH_STEP, method.rel_tol,
                                                              method.max_evals)
    return searches


def static_candidates(profile: Profile, statics: str | None) -> list[str]:
    """--statics that are splits of this profile (several setups, several GPUs), else candidates."""
    if statics:
        return [f"static:{n}" for n in map(int, statics.split(",")) if n in profile.split_sms]
    total = profile.gpu["sm_count"]
    fit = [s for s in profile.split_sms if 0.25 * total <= s <= 0.9 * total]
    step = max(1, math.ceil(len(fit) / STATIC_CANDIDATES))
    return [f"static:{s}" for s in fit[::-step][::-1]]  # thinned from the top: the large splits matter


def neighbours(profile: Profile, statics: list[str], searches: list[Search]) -> list[str]:
    """The splits beside each arrival pattern's best static that the thinned candidates skipped: the
    best fixed split may be one of them (on the H200 profiles, 104 SMs beat the candidates' 96)."""
    splits = sorted(profile.split_sms)
    found = []
    for arrivals in dict.fromkeys(s.arrivals for s in searches):
        def mean(policy: str) -> float:
            return statistics.mean(s.capacity for s in searches if s.column == policy and s.arrivals == arrivals)

        best = splits.index(int(max(statics, key=mean).partition(":")[2]))
        found += [f"static:{splits[i]}" for i in (best - 1, best + 1) if 0 <= i < len(splits)]
    return [p for p in dict.fromkeys(found) if p not in statics]


def tuned_knobs(profile: Profile, setup: Setup, slos: dict[str, float], args: argparse.Namespace) -> ControllerKnobs:
    if profile.tuned_knobs and not args.retune:
        return ControllerKnobs.for_profile(profile, slos)
    console.print(f"tuning on {setup.workload} ({args.tune_trials} trials) ...")
    out = tune(replace(profile, tuned_knobs=None), setup.workload, slos, args.tune_trials, seed=0,
               num_prompts=args.num_prompts)
    return out["best_knobs"]


def run_setup(name: str, args: argparse.Namespace, method: Method) -> dict[str, Any]:
    setup = SETUPS[name]
    profile = setup.load(args.profile)
    slos = metrics.parse_slos(args.slo or setup.slo)
    untuned = ControllerKnobs.for_profile(replace(profile, tuned_knobs=None), slos)
    columns = {c: (c, untuned) for c in ("nexus", "chunked", "prefill-first") if c in args.columns}
    if "tuned" in args.columns:
        columns["tuned"] = ("nexus", tuned_knobs(profile, setup, slos, args))
    statics = static_candidates(profile, args.statics)
    columns.update({p: (p, untuned) for p in statics})
    start, ceiling = rate_range(profile, setup.workload, method.num_prompts, 0)
    searches = [Search(c, p, k, seed, arrivals) for c, (p, k) in columns.items() for arrivals in args.arrivals
                for seed in method.seeds]
    t0 = time.perf_counter()

    def on_simulator(todo: list[Search]) -> list[Search]:
        jobs = [(profile, setup.workload, slos, method, replace(s), start, ceiling) for s in todo]
        return parallel_map(simulated, jobs, args.workers)

    simulations = on_simulator(searches)
    if args.backend == "sim":
        searches = simulations
        if statics and not args.statics:  # the best static among every split near the candidates' best
            extra = neighbours(profile, statics, searches)
            searches += on_simulator([Search(p, p, untuned, seed, arrivals) for p in extra
                                      for arrivals in args.arrivals for seed in method.seeds])
            statics += extra
            columns.update({p: (p, untuned) for p in extra})
    else:  # each search starts where the simulator put its capacity
        searches = on_engine(profile, setup, slos, method, searches, [s.capacity or start for s in simulations], args)
    console.print(f"{name}: {len(searches)} capacity searches in {time.perf_counter() - t0:.0f} s")
    return summarize(name, setup, slos, columns, statics, searches)


def summarize(name: str, setup: Setup, slos: dict[str, float], columns: dict[str, tuple[str, ControllerKnobs]],
              statics: list[str], searches: list[Search]) -> dict[str, Any]:
    """Per arrival pattern and column: mean, spread and brackets over seeds; the best static with hindsight."""
    rows: dict[str, dict[str, Any]] = {}
    for arrivals in dict.fromkeys(s.arrivals for s in searches):
        cells = {}
        for column in columns:
            mine = [s for s in searches if s.column == column and s.arrivals == arrivals]
            caps = [s.capacity for s in mine]
            cells[column] = {"mean": statistics.mean(caps), "min": min(caps), "max": max(caps),
                             "seeds": {s.seed: {"capacity": s.capacity, "bracket": s.bracket, "tried": s.tried}
                                       for s in mine}}
        best = max(statics, key=lambda p: cells[p]["mean"]) if statics else None
        rows[arrivals] = {"cells": cells, "best_static": best}
    return {"setup": name, "workload": setup.workload, "slos": slos,
            "knobs": {c: k.to_dict() for c, (_, k) in columns.items() if c in ("nexus", "tuned")}, "rows": rows}


def ratio(row: dict[str, Any], a: str, b: str | None) -> str:
    cells = row["cells"]
    if b is None or a not in cells or b not in cells or not cells[b]["mean"]:
        return "-"
    return f"{cells[a]['mean'] / cells[b]['mean']:.2f}x"


def cell(row: dict[str, Any], column: str | None) -> str:
    if column is None or column not in row["cells"]:
        return "-"
    c = row["cells"][column]
    return f"{c['mean']:.3g} ({c['min']:.3g}-{c['max']:.3g})"


def table(results: list[dict[str, Any]], method: Method) -> Table:
    t = Table(title=f"Capacity, req/s: mean (lowest-highest) over seeds {list(method.seeds)}; >= "
                    f"{method.num_prompts} requests or {method.min_duration:g} s of arrivals per rate; "
                    f"{metrics.ATTAINMENT_TARGET:.0%} of requests within both SLOs")
    for col in ("setup", "arrivals", "nexus (untuned)", "tuned", "best static", "chunked", "prefill-first",
                "untuned / tuned", "nexus / best static", "nexus / chunked"):
        t.add_column(col, justify="left" if col in ("setup", "arrivals") else "right")
    for r in results:
        for arrivals, row in r["rows"].items():
            best = row["best_static"]
            t.add_row(r["setup"], arrivals, cell(row, "nexus"), cell(row, "tuned"),
                      f"{best}: {cell(row, best)}" if best else "-", cell(row, "chunked"), cell(row, "prefill-first"),
                      ratio(row, "nexus", "tuned"), ratio(row, "nexus", best), ratio(row, "nexus", "chunked"))
    return t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("sim", "engine"), default="sim")
    p.add_argument("--setups", type=lambda s: s.split(","), default=list(SETUPS), help=", ".join(SETUPS))
    p.add_argument("--columns", type=lambda s: s.split(","), default=["nexus", "tuned", "chunked", "prefill-first"],
                   help="of nexus, tuned, chunked, prefill-first (the static splits always run)")
    p.add_argument("--statics", help="comma-separated prefill SM counts; each setup runs those its GPU has "
                   "(default: candidates from the profile)")
    p.add_argument("--arrivals", type=lambda s: s.split(","), default=list(ARRIVALS), help="poisson,bursty")
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=(0, 1, 2))
    p.add_argument("--num-prompts", type=int, default=400, help="requests per rate, at least")
    p.add_argument("--min-duration", type=float, default=60.0, help="seconds of arrivals per rate, at least")
    p.add_argument("--rel-tol", type=float, default=0.03, help="bisect until the bracket is this narrow")
    p.add_argument("--max-evals", type=int, default=12, help="rates per capacity search, at most")
    p.add_argument("--slo", help="ttft=MS,tpot=MS (default: the setup's)")
    p.add_argument("--tune-trials", type=int, default=16)
    p.add_argument("--retune", action="store_true", help="tune even where the profile has tuned knobs")
    p.add_argument("--profile", help="engine backend: this GPU's profile of the setup's model")
    p.add_argument("--model", help="engine backend: preset or checkpoint (default: the setup's)")
    p.add_argument("--device", default="cuda", help="engine backend: cuda, or cpu (tiny presets, tests)")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--workers", type=int, help="simulator processes (default: every core)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out/capacity")
    args = p.parse_args(argv)
    unknown = sorted(set(args.setups) - set(SETUPS)) + sorted(set(args.arrivals) - set(ARRIVALS))
    if unknown:
        p.error(f"unknown setup or arrivals: {', '.join(unknown)}")
    if args.backend == "engine" and not args.statics:
        p.error("--backend engine needs --statics (run the simulator first: its best static split)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    method = Method(args.num_prompts, args.min_duration, args.seeds, args.rel_tol, args.max_evals)
    results = [run_setup(name, args, method) for name in args.setups]
    console.print(table(results, method))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"backend": args.backend, "argv": sys.argv[1:], "method": method.__dict__ | {"seeds": list(method.seeds)}}
    (out / "capacity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    console.print(f"written to {out / 'capacity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
