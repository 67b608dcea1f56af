"""`nexus-tune plan`: how much traffic each policy carries under your SLOs, from a saved profile.

For every policy (nexus, chunked, prefill-first, and the best of a few static splits) it
searches the capacity with the simulator (tune.find_capacity), then simulates all of them at
a common ladder of rates for the latency table and the plot. The simulations run in worker
processes: on two cores the default 1000-request Mixed workload takes about a minute.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nexus_tune.commands.reporting import plot_latency_vs_rate, progress_bar
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.profile import Profile
from nexus_tune.commands.tune import (CEILING_NOTE, CapacityProbe, capacity_text, knobs_table, parallel_map,
                                      rate_range, search_capacity, checked_sim_inputs)

POLICIES = ("nexus", "chunked", "prefill-first")
STATIC_SHARES = (0.25, 0.375, 0.5, 0.625, 0.75)  # prefill shares of the static splits tried
RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)  # the common rates: fractions of the highest capacity
TABLE_FRACTIONS = (0.5, 0.75, 1.0)


def static_policies(profile: Profile) -> list[str]:
    """`static:N` for the pre-created splits nearest to STATIC_SHARES of the GPU."""
    total = profile.gpu["sm_count"]
    picks = {min(profile.split_sms, key=lambda s: abs(s - share * total)) for share in STATIC_SHARES}
    return [f"static:{n}" for n in sorted(picks)]


def statics_beside(profile: Profile, best: str, tried: list[str]) -> list[str]:
    """`static:N` for the splits on either side of `best` that are not in `tried`: the best fixed split
    may fall between the candidates (on the H200 profiles 104 SMs beat every candidate, 96 among them)."""
    splits = sorted(profile.split_sms)
    i = splits.index(int(best.partition(":")[2]))
    beside = [f"static:{splits[j]}" for j in (i - 1, i + 1) if 0 <= j < len(splits)]
    return [p for p in beside if p not in tried]


def recommended_knobs(profile: Profile, slos: dict[str, float]) -> ControllerKnobs:
    """The profile's tuned knobs if any, else knobs derived from it; slo-mode targets from the SLOs."""
    return ControllerKnobs.for_profile(profile, slos)


def _at_rates(probe: CapacityProbe, rates: list[float]) -> dict[float, dict]:
    """Summaries at `rates` (a process-pool job)."""
    return {rate: probe.summary(rate) for rate in rates}


def plan(profile: Profile, workload: str, slos: dict[str, float], num_prompts: int = 1000, seed: int = 0,
         workers: int | None = None, progress: Progress | None = None) -> dict:
    """Capacity per policy and latencies at common rates.

    Returns {"knobs", "rates", "capacity": {policy: req/s}, "summaries": {policy: {rate: summary}},
    "best_static", "policies", "ceiling"} where "policies" lists the reported ones (nexus, chunked,
    prefill-first, best static: the best of `static_policies` and the splits beside it) and "ceiling"
    is the rate no search goes above.
    """
    knobs = recommended_knobs(profile, slos)
    start, ceiling = rate_range(profile, workload, num_prompts, seed)
    candidates = [*POLICIES, *static_policies(profile)]
    probes: dict[str, CapacityProbe] = {}
    task = progress.add_task("capacity per policy", total=len(candidates)) if progress else None
    advance = (lambda: progress.advance(task)) if progress else (lambda: None)
    capacity: dict[str, float] = {}
    summaries: dict[str, dict] = {}

    def search(policies: list[str]) -> None:
        for p in policies:
            probes[p] = CapacityProbe(profile, workload, num_prompts, seed, slos, p, knobs)
        found = parallel_map(search_capacity, [(probes[p], start, 2.0, 10, 0.0, ceiling) for p in policies],
                             workers, advance)
        for p, (cap, s) in zip(policies, found):
            capacity[p], summaries[p] = cap, dict(s)

    search(candidates)
    statics = candidates[len(POLICIES):]
    beside = statics_beside(profile, max(statics, key=lambda p: capacity[p]), statics)
    if progress:
        progress.update(task, total=len(candidates) + len(beside))
    search(beside)
    best_static = max([*statics, *beside], key=lambda p: capacity[p])
    reported = [*POLICIES, best_static]

    top = max(capacity[p] for p in reported) or start  # nothing passed: show the rates around the start
    rates = [round(f * top, 4) for f in RATE_FRACTIONS]
    jobs = [(probes[p], [r for r in rates if r not in summaries[p]]) for p in reported]
    if progress:
        progress.update(task, description="latency at common rates", total=len(capacity) + len(jobs))
    for p, found in zip(reported, parallel_map(_at_rates, jobs, workers, advance)):
        summaries[p].update(found)
    return {"knobs": knobs, "rates": rates, "capacity": capacity, "summaries": summaries,
            "best_static": best_static, "policies": reported, "ceiling": ceiling}


def plan_table(result: dict, title: str) -> Table:
    shown = [result["rates"][RATE_FRACTIONS.index(f)] for f in TABLE_FRACTIONS]
    caption = "at each rate: p99 TTFT/TPOT (ms) and the share of requests meeting the SLOs"
    if any(result["capacity"][p] >= result["ceiling"] for p in result["policies"]):
        caption += "\n" + CEILING_NOTE
    table = Table(title=title, caption=caption)
    table.add_column("policy", no_wrap=True)
    table.add_column("capacity, req/s\n(x chunked)", justify="right", no_wrap=True)
    for rate in shown:
        table.add_column(f"at {rate:.3g}\nreq/s", justify="right", no_wrap=True)
    base = result["capacity"]["chunked"]
    for p in result["policies"]:
        cap = result["capacity"][p]
        cells = [f"{s['p99_ttft_ms']:.0f} / {s['p99_tpot_ms']:.1f}\n{s['slo_attainment']:.0%}"
                 for s in (result["summaries"][p][rate] for rate in shown)]
        text = capacity_text(cap, result["ceiling"])
        table.add_row(p, f"{text}\n({cap / base:.2f}x)" if base else text, *cells, end_section=True)
    return table


def run_plan(args) -> int:
    if (inputs := checked_sim_inputs(args)) is None:
        return 2
    profile, slos = inputs
    console = Console()
    progress = progress_bar(console)
    with progress:
        result = plan(profile, args.workload, slos, args.num_prompts, args.seed, progress=progress)
    title = (f"{profile.model['name']} on {profile.gpu.get('name', profile.gpu['slug'])}, {args.workload} "
             f"({args.num_prompts} requests): capacity = the highest rate with 90% of requests within "
             + ", ".join(f"{k} {v:g} ms" for k, v in slos.items()))
    console.print(plan_table(result, title))
    console.print(knobs_table({"nexus": result["knobs"]}, "Recommended controller knobs"))
    console.print("(tuned, from the profile)" if profile.tuned_knobs else
                  "(derived from the profile and the SLOs; `nexus-tune tune` searches knobs and writes them into it)")
    if args.plot:
        series = {p: [(r, result["summaries"][p][r]) for r in result["rates"]] for p in result["policies"]}
        plot_latency_vs_rate(series, slos, args.plot, {p: result["capacity"][p] or None for p in result["policies"]})
        console.print(f"Plot written to {args.plot}")
    return 0
