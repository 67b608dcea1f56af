"""`nexus-tune simulate`: a workload replayed on a profile by the simulator (core/simulator.py), one
row per policy, with the controller's knobs as nexus would run them.
"""
from __future__ import annotations
from typing import TYPE_CHECKING
from nexus_tune.core import metrics
from nexus_tune.core.simulator import simulate
if TYPE_CHECKING:
    from nexus_tune.core.profile import Profile

# (row label, summary key, format) of the `nexus-tune simulate` table.
_TABLE_ROWS = [
    ("completed", "completed", "{}"),
    ("failed", "failed", "{}"),
    ("requests/s", "request_throughput", "{:.2f}"),
    ("output tokens/s", "output_throughput", "{:.0f}"),
    *[(f"{stat} {name.upper()} (ms)", f"{stat}_{name}_ms", "{:.1f}")
      for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "p99")],
    ("goodput (req/s)", "goodput", "{:.2f}"),
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("preemptions", "num_preemptions", "{}"),
    ("split switches", "split_switches", "{}"),
]


def default_policies(profile: Profile) -> list[str]:
    """Every policy; the static split is the pre-created one closest to half the GPU."""
    half = min(profile.split_sms, key=lambda s: abs(s - profile.gpu["sm_count"] / 2))
    return ["nexus", "chunked", "prefill-first", f"static:{half}"]


def run_simulate(args) -> int:
    """`nexus-tune simulate`: replay one trace under each policy and compare them in one table."""
    from rich.console import Console
    from rich.table import Table

    from nexus_tune.commands.cli import report_error
    from nexus_tune.commands.plan import recommended_knobs
    from nexus_tune.core.profile import Profile, ProfileError
    from nexus_tune.core.workload import make_trace

    console = Console()
    try:
        profile = Profile.load(args.profile)
        slos = metrics.parse_slos(args.slo)
        trace = make_trace(args.workload, args.num_prompts, args.request_rate, args.burstiness, args.seed)
        policies = args.policy or default_policies(profile)  # the CLI checked the names
        knobs = recommended_knobs(profile, slos)  # as `plan` does: tuned knobs, slo targets from --slo
        results = []
        with console.status("") as status:
            for policy in policies:
                status.update(f"simulating {policy} on {len(trace)} requests ...")
                results.append(simulate(profile, trace, policy, knobs))
    except (ProfileError, ValueError, OSError) as e:
        report_error(str(e))
        return 2

    slo_text = ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items()) or "none"
    table = Table(title=f"{args.workload}: {len(trace)} requests at {args.request_rate:g} req/s "
                        f"(burstiness {args.burstiness:g}); SLOs: {slo_text}; nexus controller: {knobs.mode} mode")
    table.add_column("metric")
    for result in results:
        table.add_column(result.policy, justify="right")
    summaries = [r.summary(slos) for r in results]
    for label, key, fmt in _TABLE_ROWS:
        if summaries[0].get(key) is not None:  # goodput rows only with SLOs
            table.add_row(label, *(fmt.format(s[key]) for s in summaries))
    console.print(table)
    return 0
