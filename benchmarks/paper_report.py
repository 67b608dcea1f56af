"""docs/results.md from the files of benchmarks/paper_eval.py runs (issue 8), on the CPU.

    PYTHONPATH=. python benchmarks/paper_report.py out/paper [more folders or files] --out docs/results.md

Reads every paper_eval JSON under the given paths (files of one setup from several calls merge
per policy and rate; the newer run of a rate wins) and writes, per model and workload: capacity
per policy and its ratio to chunked, mean and p99 TTFT and TBT per rate, issue 8's targets with
met or missed and by how much, and where one is missed the measurements that say why (simulated
against measured, step times against the profile, decode slowdown beside prefill, prefill step
times, host and scheduler time, which SLO the misses broke); chunked's own efficiency against the
roofline; the device, dates and commands. Plots go next to the markdown file:
results-<model>-<workload>-latency.png (latency against rate per policy) and
results-<model>-<workload>-split.png (nexus's split over time in one run).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.paper_eval import PolicyResult
from nexus_tune.core import metrics

console = Console()
WORKLOAD_NAMES = {"mixed": "Mixed", "longdata": "Long Data Collections", "arxiv": "ArXiv Summarization",
                  "sharegpt-synth": "ShareGPT (synthetic)"}
POLICY_ORDER = ("nexus", "chunked", "prefill-first")
NEAREST_RATE = 0.1  # a run within this share of chunked's capacity stands in for a run exactly there


@dataclass(frozen=True)
class CapacityTarget:
    """nexus capacity at least `ratio` x `baseline`'s (issue 8)."""

    workload: str
    baseline: str
    ratio: float


@dataclass(frozen=True)
class LatencyTarget:
    """At the rate where chunked reaches its capacity, `baseline`'s metric over nexus' at least `ratio`."""

    metric: str
    label: str
    ratio: float
    baseline: str = "chunked"


CAPACITY_TARGETS = (CapacityTarget("mixed", "chunked", 1.9), CapacityTarget("longdata", "chunked", 1.5),
                    CapacityTarget("mixed", "prefill-first", 1.2), CapacityTarget("longdata", "prefill-first", 1.2))
LATENCY_TARGETS = (LatencyTarget("mean_ttft_ms", "mean TTFT", 2.0), LatencyTarget("p99_itl_ms", "p99 TBT", 1.5))


# -- input ------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """One model and workload: the merged result of every policy, and the meta of the files read."""

    model: str
    workload: str
    metas: list[dict[str, Any]]
    policies: dict[str, PolicyResult]

    @property
    def meta(self) -> dict[str, Any]:
        return self.metas[-1]

    @property
    def slug(self) -> str:
        return f"{self.model}-{self.workload}".replace("/", "-")

    def ordered(self) -> list[PolicyResult]:
        rank = {p: i for i, p in enumerate(POLICY_ORDER)}
        return sorted(self.policies.values(), key=lambda r: (rank.get(r.policy, len(rank)), r.policy))


def find_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p} does not exist")
    return files


def load(paths: list[str]) -> list[Setup]:
    """Every paper_eval file under `paths`, merged per (model, workload) and policy, oldest first."""
    docs = []
    for path in find_files(paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            console.print(f"[yellow]skipping {path}: {e}[/]")
            continue
        if isinstance(data, dict) and data.get("kind") == "paper_eval":
            docs.append(data)
    docs.sort(key=lambda d: d["meta"]["date"])
    setups: dict[tuple[str, str], Setup] = {}
    for d in docs:
        key = (d["meta"]["model"], d["meta"]["workload"])
        setup = setups.setdefault(key, Setup(*key, [], {}))
        setup.metas.append(d["meta"])
        new = PolicyResult.from_json(d)
        old = setup.policies.get(new.policy)
        setup.policies[new.policy] = new if old is None else merge(old, new)
    return list(setups.values())


def merge(old: PolicyResult, new: PolicyResult) -> PolicyResult:
    """`new`'s runs over `old`'s at the same rates; the other parts from `new` where it has them."""
    runs = {r["rate"]: r for r in old.runs} | {r["rate"]: r for r in new.runs}
    timelines = [t for t in (old.split_timeline, new.split_timeline) if t]
    best = max(timelines, key=lambda t: (t["passed"], t["rate"]), default=None)
    return PolicyResult(new.policy, new.requested, new.sim_capacity, new.ladder,
                        list(dict.fromkeys(old.commands + new.commands)),
                        sorted(runs.values(), key=lambda r: r["rate"]),
                        new.engine or old.engine, best, new.chunked_efficiency or old.chunked_efficiency,
                        new.error if not new.runs else None)


# -- numbers ------------------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fx(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def verdict(measured: float | None, required: float) -> str:
    if measured is None:
        return "not measured"
    if measured >= required:
        return f"**met** ({measured / required - 1:+.0%})"
    return f"**missed** by {1 - measured / required:.0%}"


def capacity_ratio(a: PolicyResult, b: PolicyResult) -> tuple[float | None, str]:
    """a's capacity over b's, and the range the (pass, fail) brackets allow."""
    (ca, fa), (cb, fb) = a.bracket(), b.bracket()
    if not ca or not cb:
        return None, ""
    low = ca / fb if fb else None
    high = fa / cb if fa else None
    bounds = f" (brackets allow {fmt(low, '.2f', '?')}-{fmt(high, '.2f', '>')}x)" if low or high else ""
    return ca / cb, bounds


def run_near(result: PolicyResult, rate: float) -> dict[str, Any] | None:
    runs = [r for r in result.runs if abs(r["rate"] / rate - 1) <= NEAREST_RATE]
    return min(runs, key=lambda r: abs(r["rate"] - rate), default=None)


def note(run: dict[str, Any]) -> str:
    return {None: "", "slo": " (stopped early†)", "deadline": " (cut by the time budget‡)"}[run["stopped"]]


# -- sections -----------------------------------------------------------------------------------------

def header(setups: list[Setup], command: str) -> list[str]:
    devices = sorted({m["device"] for s in setups for m in s.metas})
    dates = sorted({m["date"][:10] for s in setups for m in s.metas})
    lines = ["# Results: the paper's evaluation on the lent GPU (issue 8)", "",
             f"Device: {', '.join(devices)}; dates: {', '.join(dates)}; torch "
             f"{', '.join(sorted({m['torch'] for s in setups for m in s.metas}))}. Every number comes from runs of "
             "`benchmarks/paper_eval.py` on that device (random bf16 weights, greedy, Poisson arrivals); the "
             "simulator only chose the rates, and its capacities are shown beside the measured ones. Capacity = the "
             "highest rate tried at which at least 90% of requests met every SLO.", "",
             "| model | workload | nexus capacity, req/s | x chunked | x prefill-first | targets met |",
             "|---|---|---|---|---|---|"]
    for s in setups:
        nexus = s.policies.get("nexus")
        ratios = [capacity_ratio(nexus, s.policies[b])[0] if nexus and b in s.policies else None
                  for b in ("chunked", "prefill-first")]
        met = [t for t in targets(s) if t[3] is not None]
        lines.append(f"| {s.model} | {WORKLOAD_NAMES.get(s.workload, s.workload)} | "
                     f"{fmt(nexus.capacity() if nexus else None, 'g')} | {fx(ratios[0])} | {fx(ratios[1])} | "
                     f"{sum(t[3] >= t[2] for t in met)} of {len(targets(s))} |")
    lines += ["", "Commands (on the device, from the repository root; then this report on any machine):", ""]
    commands = list(dict.fromkeys(c for s in setups for r in s.policies.values() for c in r.commands))
    lines += [f"    {c}" for c in commands] + [f"    {command}", ""]
    return lines


def setup_intro(s: Setup) -> list[str]:
    m = s.meta
    slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in m["slos"].items())
    prof = m["profile"]
    return [f"## {s.model}, {WORKLOAD_NAMES.get(s.workload, s.workload)}: {slos}", "",
            f"{m['num_prompts']}+ requests per rate (at least {m['min_duration']:g} s of Poisson arrivals, seed "
            f"{m['seed']}, the same requests for every policy), outputs capped at {m['max_output']} tokens, prompts at "
            f"{m['max_model_len'] - m['max_output']}. Profile: {prof['grid']} grid of {prof['created'][:10]}"
            f"{', tuned knobs' if prof['tuned_knobs'] else ', default knobs (not tuned)'}; nexus controller in "
            f"{m['knobs']['mode']} mode, {m['knobs']['prefill_chunk_tokens']}-token prefill chunks.", ""]


def capacity_table(s: Setup) -> list[str]:
    base = s.policies.get("chunked")
    lines = ["| policy | capacity, req/s | first failing rate | x chunked | simulated capacity "
             "| measured / simulated |", "|---|---|---|---|---|---|"]
    for r in s.ordered():
        cap, bad = r.bracket()
        ratio, bounds = capacity_ratio(r, base) if base else (None, "")
        name = r.policy + (" (static:best)" if r.requested == "static:best" else "")
        lines.append(f"| {name} | {fmt(cap, 'g', 'none passed')} | {fmt(bad, 'g')} | {fx(ratio)}{bounds} | "
                     f"{r.sim_capacity:.3g} | "
                     f"{fmt(cap / r.sim_capacity if cap and r.sim_capacity else None, '.2f')} |")
    return lines + [""]


def latency_table(s: Setup) -> list[str]:
    lines = ["| policy | rate, req/s | SLO met | mean TTFT | p99 TTFT | mean TBT | p99 TBT | mean TPOT "
             "| split switches | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s.ordered():
        for run in r.runs:
            x = run["summary"]
            lines.append(f"| {r.policy} | {run['rate']:g} | {x['slo_attainment']:.0%} | {x['mean_ttft_ms']:.0f} | "
                         f"{x['p99_ttft_ms']:.0f} | {x['mean_itl_ms']:.1f} | {x['p99_itl_ms']:.1f} | "
                         f"{x['mean_tpot_ms']:.1f} | {run['split_switches']} | {note(run).strip(' ()')} |")
    return lines + ["", "Latencies in ms; TBT = every gap between streamed tokens. † stopped once more than 10% of "
                    "its requests were certain to miss an SLO (the rate failed; latencies of the requests finished by "
                    "then). ‡ cut by the time budget: not counted.", ""]


def targets(s: Setup) -> list[tuple[str, str, float, float | None, str]]:
    """(target, measured text, required ratio, measured ratio or None, where) for this setup."""
    out = []
    nexus = s.policies.get("nexus")
    for t in CAPACITY_TARGETS:
        if t.workload != s.workload:
            continue
        base = s.policies.get(t.baseline)
        missing = [p for p, r in (("nexus", nexus), (t.baseline, base)) if r is None]
        ratio, bounds = capacity_ratio(nexus, base) if not missing else (None, "")
        text = f"{' and '.join(missing)} not run" if missing else f"{fx(ratio)}{bounds}"
        out.append((f"capacity: nexus / {t.baseline}", text, t.ratio, ratio, ""))
    chunked = s.policies.get("chunked")
    rate = chunked.capacity() if chunked else None
    for t in LATENCY_TARGETS:
        if rate is None or nexus is None:
            out.append((f"{t.label} at chunked's capacity: chunked / nexus", "chunked's capacity not measured"
                        if rate is None else "nexus not run", t.ratio, None, ""))
            continue
        mine, theirs = run_near(nexus, rate), run_near(chunked, rate)
        if mine is None or theirs is None:
            out.append((f"{t.label} at chunked's capacity ({rate:g} req/s): chunked / nexus",
                        "nexus has no run there", t.ratio, None, ""))
            continue
        a, b = theirs["summary"][t.metric], mine["summary"][t.metric]
        ratio = a / b if b else None
        where = f"nexus at {mine['rate']:g} req/s{note(mine)}"
        out.append((f"{t.label} at chunked's capacity ({rate:g} req/s): chunked / nexus",
                    f"{a:.1f} / {b:.1f} ms = {fx(ratio)}", t.ratio, ratio, where))
    return out


def targets_table(s: Setup) -> list[str]:
    lines = ["| target | measured | required | result |", "|---|---|---|---|"]
    for name, text, required, ratio, where in targets(s):
        lines.append(f"| {name} | {text}{f' ({where})' if where else ''} | >= {required:g}x | "
                     f"{verdict(ratio, required)} |")
    return lines + [""]


def _dist(d: dict[str, float] | None, spec: str = ".2f") -> str:
    return "-" if not d else f"p50 {d['p50']:{spec}}, p99 {d['p99']:{spec}} (n={d['n']})"


def focus_run(r: PolicyResult) -> dict[str, Any] | None:
    """The run that says most about a policy's limit: its first failing rate, else its highest rate."""
    _, bad = r.bracket()
    return next((x for x in r.runs if x["rate"] == bad), None) or (r.runs[-1] if r.runs else None)


def evidence(policy: str, run: dict[str, Any]) -> str:
    """One run's measurements, in one line: SLO misses, simulator against measurement, step times
    (alone and against the profile), decode slowdown, host and scheduler time."""
    x, sim = run["summary"], run["simulated"]
    parts = [f"at {run['rate']:g} req/s{note(run)}: {x['slo_attainment']:.0%} met; misses "
             + ", ".join(f"{k} {v}" for k, v in run["slo_misses"].items()),
             f"simulated there: {sim['slo_attainment']:.0%} met, mean TTFT {sim['mean_ttft_ms']:.0f} ms against "
             f"{x['mean_ttft_ms']:.0f} measured, mean TPOT {sim['mean_tpot_ms']:.1f} against {x['mean_tpot_ms']:.1f}",
             "step GPU ms " + "; ".join(f"{k} {_dist(v, '.1f')}" for k, v in run["steps"].items())]
    if run["vs_profile"]:
        parts.append("measured / profile-predicted step time "
                     + "; ".join(f"{k} {_dist(v)}" for k, v in run["vs_profile"].items()))
    if run["interference"]:
        inter = run["interference"]
        parts.append(f"{inter['what']}: {inter['ratio']:.2f}x over {inter['steps']} steps")
    host = "; ".join(f"{loop} loop GPU-busy {fmt(v['gpu_busy'], '.0%')}, host beyond GPU "
                     f"{_dist(v['host_over_gpu_ms'])} ms" for loop, v in run["loops"].items())
    sched, ctrl = run["sched_us_per_step"], run["controller_us_per_decision"]
    parts.append(f"host: {host}; scheduler {fmt(sched and sched['mean'])} us/step"
                 + (f", controller {ctrl['mean']:.0f} us/decision (p99 {ctrl['p99']:.0f})" if ctrl else ""))
    return f"- **{policy}** " + ". ".join(parts) + "."


def why(s: Setup) -> list[str]:
    """The measurements behind missed targets: each policy at its first failing rate (else its highest),
    and nexus and chunked at chunked's capacity when a latency target there was missed."""
    missed = [t for t in targets(s) if t[3] is None or t[3] < t[2]]
    if not missed:
        return []
    lines = ["### Why targets were missed: the measurements", "",
             "Missed: " + "; ".join(f"{t[0]} ({t[1]})" for t in missed) + ".", ""]
    shown = set()
    for r in s.ordered():
        run = focus_run(r)
        lines.append(evidence(r.policy, run) if run else f"- **{r.policy}**: no run ({r.error or 'not run'}).")
        shown.add((r.policy, run and run["rate"]))
    chunked, nexus = s.policies.get("chunked"), s.policies.get("nexus")
    rate = chunked.capacity() if chunked else None
    if rate and nexus and any(t[0].startswith(tuple(x.label for x in LATENCY_TARGETS)) for t in missed):
        extra = [evidence(r.policy, run) for r in (nexus, chunked)
                 if (run := run_near(r, rate)) and (r.policy, run["rate"]) not in shown]
        lines += ["", f"At chunked's capacity ({rate:g} req/s):", "", *extra] if extra else []
    return lines + [""]


def efficiency(s: Setup) -> list[str]:
    chunked = s.policies.get("chunked")
    eff = chunked and chunked.chunked_efficiency
    if not eff:
        return ["chunked's efficiency: no mixed steps were logged.", ""]
    line = (f"**chunked's own efficiency** ({eff['mixed_steps']} mixed steps of its runs, rows per step "
            f"{_dist(eff['mixed_rows'], '.0f')}): ")
    if eff.get("mixed_vs_roofline"):
        med = eff["mixed_vs_roofline"]["p50"]
        c = eff["ceilings"]
        line += (f"a mixed step took a median {med:.2f}x the roofline for its rows ({1 / med:.0%} of it; p99 "
                 f"{eff['mixed_vs_roofline']['p99']:.2f}x; FLOPs at {c['matmul_tflops']:.0f} TFLOP/s, bytes at "
                 f"{c['copy_gbps']:.0f} GB/s, both measured in the same run)")
        if eff.get("prefill_vs_roofline"):
            line += f", its prefill-only steps {eff['prefill_vs_roofline']['p50']:.2f}x"
        line += "; "
    line += (f"{eff['mixed_vs_profile_prefill']['p50']:.2f}x the profile's whole-GPU prefill time for the same "
             "tokens (median).")
    return [line, ""]


# -- plots --------------------------------------------------------------------------------------------

def plot_latency(s: Setup, path: Path) -> None:
    """SLO attainment, mean TTFT, p99 TBT and mean TPOT against rate, one line per policy."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = (("slo_attainment", "SLO attainment", None), ("mean_ttft_ms", "mean TTFT (ms)", "ttft"),
              ("p99_itl_ms", "p99 TBT (ms)", None), ("mean_tpot_ms", "mean TPOT (ms)", "tpot"))
    slos = s.meta["slos"]
    for ax, (key, label, slo) in zip(axes, panels):
        for i, r in enumerate(s.ordered()):
            runs = [x for x in r.runs if x["stopped"] != "deadline"]
            if not runs:
                continue
            rates = [x["rate"] for x in runs]
            ax.plot(rates, [x["summary"][key] for x in runs], "-", color=f"C{i}", label=r.policy)
            for x in runs:  # hollow: stopped early, latencies of the requests finished by then
                ax.plot(x["rate"], x["summary"][key], "o", color=f"C{i}", mfc="none" if x["stopped"] else f"C{i}")
            if r.capacity():
                ax.axvline(r.capacity(), color=f"C{i}", linestyle=":", alpha=0.7)
        if key == "slo_attainment":
            ax.axhline(metrics.ATTAINMENT_TARGET, color="black", linestyle="--", linewidth=1)
        elif slo in slos:
            ax.axhline(slos[slo], color="black", linestyle="--", linewidth=1, label=f"SLO {slos[slo]:g} ms")
        if key != "slo_attainment":
            ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle(f"{s.model}, {WORKLOAD_NAMES.get(s.workload, s.workload)}: dotted = capacity, hollow = stopped early")
    fig.savefig(path, dpi=110)


def plot_split(s: Setup, path: Path) -> bool:
    """nexus's prefill SMs over one run, above the queue and the decode batch it followed; False if
    there is no timeline."""
    nexus = s.policies.get("nexus")
    tl = nexus and nexus.split_timeline
    if not tl or not tl["splits"]:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    t, sms = zip(*tl["splits"])
    top.step(t, sms, where="post", color="C0")
    top.set_ylim(0, tl["total_sms"] * 1.05)
    top.set_ylabel("prefill SMs (of %d)" % tl["total_sms"])
    top.set_title(f"nexus split over one run at {tl['rate']:g} req/s ({s.model}, {s.workload})")
    for key, label, color in (("queue", "requests waiting for a first token", "C3"),
                              ("decode_batch", "decode batch", "C1")):
        if tl.get(key):
            x, y = zip(*tl[key])
            bottom.plot(x, y, color=color, linewidth=1, label=label)
    bottom.set_xlabel("seconds from the run's first step")
    bottom.set_ylabel("requests")
    bottom.legend(fontsize="small", loc="upper right")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)
    return True


# -- the document ------------------------------------------------------------------------------------

def section(s: Setup, folder: Path) -> list[str]:
    lines = setup_intro(s) + ["### Capacity under the SLOs", ""] + capacity_table(s)
    latency_png = folder / f"results-{s.slug}-latency.png"
    plot_latency(s, latency_png)
    lines += ["### Latency per rate", ""] + latency_table(s) + [f"![latency against rate]({latency_png.name})", ""]
    split_png = folder / f"results-{s.slug}-split.png"
    if plot_split(s, split_png):
        lines += [f"![nexus split over time]({split_png.name})", ""]
    lines += ["### Targets (issue 8)", ""] + targets_table(s) + why(s) + efficiency(s)
    return lines


def report(setups: list[Setup], out: Path, command: str, analysis: str = "") -> str:
    """The whole report; `analysis` (markdown written by a person) goes right after the summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = header(setups, command)
    if analysis:
        lines += [analysis.rstrip(), ""]
    for s in setups:
        lines += section(s, out.parent)
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="paper_eval result files or folders holding them")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--analysis", help="a markdown file of conclusions to place after the summary table")
    args = p.parse_args(argv)
    try:
        setups = load(args.paths)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    if not setups:
        console.print(f"[red]error:[/] no paper_eval results under {', '.join(args.paths)}")
        return 2
    command = "PYTHONPATH=. python benchmarks/paper_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report(setups, Path(args.out), command, Path(args.analysis).read_text() if args.analysis else "")
    for s in setups:
        for line in why(s):
            if line.startswith("- ") or line.startswith("Missed"):
                console.print(f"{s.model}/{s.workload}: {line}", soft_wrap=True)
    console.print(f"wrote {args.out} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
