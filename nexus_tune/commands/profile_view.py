"""A profile as tables (fit error, cross-validation, saturation, operator classes, step overhead) and
as a plot of latency against SMs: `nexus-tune profile show`, the summary `nexus-tune profile` prints;
`nexus-tune profile check` (cross-validated error) and `nexus-tune profile refit` (a new fit from
the stored samples), both without a GPU.
"""
from __future__ import annotations
import json
from pathlib import Path
from typing import Any
import numpy as np
from nexus_tune.core.crossval import (FOLDS, GROUPS, SEED, TARGET_MAPE_PCT, TARGET_WORST_PCT, cross_validate,
                                      describe_point, meets_targets)
from nexus_tune.core.latency_model import PHASES, LatencyModel
from nexus_tune.core.overhead import overhead_table
from nexus_tune.core.profile import Profile, ProfileError

# -- summary and plot --------------------------------------------------------------------------
def _plot_configs(profile: Profile, phase: str, limit: int = 4) -> list[tuple[int, int]]:
    """(size, kv) pairs to draw: those with the most solo whole-step samples, spread over sizes."""
    counts: dict[tuple[int, int], int] = {}
    for s in profile.samples:
        if s.phase == phase and s.part == "all" and not s.prefill_tokens:
            counts[(s.size, s.kv)] = counts.get((s.size, s.kv), 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    chosen = sorted(ranked[: 2 * limit])
    picks = sorted({chosen[round(i)] for i in np.linspace(0, len(chosen) - 1, min(limit, len(chosen)))})
    if picks:
        return picks
    return [(512, 0), (2048, 0), (8192, 0)] if phase == "prefill" else [(8, 16384), (64, 131072), (256, 262144)]


def _reference_points(profile: Profile) -> list[tuple[str, int, int]]:
    cap = max(profile.kv_capacity_tokens, 1)
    return ([("prefill", n, 0) for n in (512, 2048, 8192)]
            + [("decode", b, min(b * 2048, cap)) for b in (8, 64, 256)])


def _largest_side(m: LatencyModel, phase: str) -> int:
    """The most SMs `phase` gets inside a split (the whole GPU when the model knows no splits)."""
    sides = m.sm_choices(phase)
    return sides[-2] if len(sides) > 1 else sides[-1]


def summary_tables(profile: Profile) -> list[Any]:
    """Rich tables: identity, held-out error, saturation points, fitted parameters, step overhead."""
    from rich.table import Table

    m = profile.latency_model
    info = Table(title="Profile" + (" [bold red](SYNTHETIC: tests only)[/]" if profile.synthetic else ""),
                 show_header=False)
    gran = profile.granularity
    for key, value in [
        ("GPU", f"{profile.gpu.get('name', '?')} ({profile.gpu['slug']}, {profile.gpu['sm_count']} SMs)"),
        ("model", f"{profile.model['name']} (config {profile.model['config_hash']})"),
        ("created", profile.created),
        ("backend", f"{profile.backend}, granularity {gran.get('min_partition')}/{gran.get('alignment')}"),
        ("splits (prefill SMs)", ", ".join(map(str, profile.split_sms))),
        ("KV capacity", f"{profile.kv_capacity_tokens:,} tokens"),
        ("samples", f"{len(profile.samples)} ({sum(s.holdout for s in profile.samples)} held out)"),
        ("grid", ", ".join(f"{k} {v}" for k, v in profile.grid.items() if not isinstance(v, (list, dict)))),
        ("software", ", ".join(f"{k} {v}" for k, v in profile.software.items() if v)),
        ("tuned knobs", json.dumps(profile.tuned_knobs) if profile.tuned_knobs else "none"),
        ("model refitted", profile.refitted or "no (as profiled)"),
    ]:
        info.add_row(key, value)

    err = Table(title="Fit error on held-out points (the profiler's)")
    for col in ("phase", "MAPE %", "max %", "points"):
        err.add_column(col, justify="right" if col != "phase" else "left")
    for phase, e in profile.fit_error.items():
        err.add_row(phase, f"{e['mape_pct']:.1f}", f"{e['max_pct']:.1f}", str(e["n"]))
    tables = [info, err] + ([cv_table(profile.cross_validation)] if profile.cross_validation else [])

    sat = Table(title="Saturation: fewest SMs within 5% of the whole GPU, and of the phase's largest partition")
    for col in ("phase", "size", "KV", "whole GPU ms", "SMs", "largest side ms", "SMs "):
        sat.add_column(col, justify="left" if col == "phase" else "right")
    for phase, size, kv in _reference_points(profile):
        largest = _largest_side(m, phase)
        sat.add_row(phase, str(size), f"{kv:,}", f"{m.predict(phase, size, kv, m.total_sms):.2f}",
                    str(m.saturation_sms(phase, size, kv)), f"{m.predict(phase, size, kv, largest):.2f}",
                    str(m.saturation_sms(phase, size, kv, reference_sms=largest)))

    par = Table(title="Operator classes (SM shares)")
    for col in ("phase", "class", "r_sat", "decay", "mem r_sat", "mem decay", "whole", "t0 ms", "launch ms"):
        par.add_column(col, justify="left" if col in ("phase", "class") else "right")
    for phase in PHASES:
        for cls, p in m.classes_[phase].items():
            par.add_row(phase, cls, f"{p.r_sat:.3f}", f"{p.decay:.2f}", f"{p.mem_r_sat:.3f}", f"{p.mem_decay:.2f}",
                        f"{p.whole:.3f}", f"{p.t0_ms:.3f}", f"{p.launch_ms:.3f}")
    waves = {f"{ph} {c}": p.wave_programs for ph in PHASES for c, p in m.classes_[ph].items() if p.wave_programs}
    par.caption = "contention " + ", ".join(f"{k} {v:.3g}" for k, v in m.contention_.items()) + "; waves " + (
        ", ".join(f"{k} {v:g} programs per tile per SM" for k, v in waves.items()) or "none")
    tables += [sat, par]
    if profile.step_overhead is not None:
        tables.append(overhead_table(profile.step_overhead, "Engine step overhead: cycle = scale x predicted + fixed "
                                                            "+ per_seq x rows (the simulator adds it)"))
    return tables


def cv_table(summary: dict[str, Any], title: str = "Cross-validated error") -> Any:
    """A rich table of a cross-validation summary (crossval.CrossValidation.summary()): per group the
    MAPE and the worst held-out point, marked where they miss the targets."""
    from rich.table import Table

    table = Table(title=f"{title} ({summary['folds']}-fold, seed {summary['seed']}; every point held out once)")
    for col in ("group", "points", "MAPE %", "worst %", "worst point (measured -> predicted ms)"):
        table.add_column(col, justify="left" if col.startswith(("group", "worst point")) else "right")
    for group, g in summary["groups"].items():
        w = g["worst"]
        mape = f"{g['mape_pct']:.2f}" if g["mape_pct"] <= TARGET_MAPE_PCT else f"[yellow]{g['mape_pct']:.2f}[/]"
        worst = f"{w['error_pct']:+.1f}" if g["max_pct"] <= TARGET_WORST_PCT else f"[yellow]{w['error_pct']:+.1f}[/]"
        table.add_row(group, str(g["n"]), mape, worst, f"{describe_point(w)} ({w['ms']:.2f} -> {w['predicted_ms']:.2f})")
    table.caption = f"targets: MAPE <= {TARGET_MAPE_PCT:g}% and worst <= {TARGET_WORST_PCT:g}% per group"
    return table


def cv_comparison(before: dict[str, Any], after: dict[str, Any]) -> Any:
    """Before and after a refit, group by group: MAPE and worst point."""
    from rich.table import Table

    table = Table(title="Cross-validated error before -> after the refit")
    for col in ("group", "MAPE %", "worst %", "worst point after"):
        table.add_column(col, justify="left" if col in ("group", "worst point after") else "right")
    for group in GROUPS:
        if group in before["groups"] and group in after["groups"]:
            b, a = before["groups"][group], after["groups"][group]
            table.add_row(group, f"{b['mape_pct']:.2f} -> {a['mape_pct']:.2f}", f"{b['max_pct']:.1f} -> {a['max_pct']:.1f}",
                          describe_point(a["worst"]))
    return table


def plot_profile(profile: Profile, path: str | Path) -> Path:
    """Latency against SMs per phase: samples (o trained on, x held out), the fit, saturation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = profile.latency_model
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, phase in zip(axes, PHASES):
        partitions = m.sm_choices(phase)[:-1]
        for i, (size, kv) in enumerate(_plot_configs(profile, phase)):
            color = f"C{i}"
            ax.plot(partitions, [m.predict(phase, size, kv, s) for s in partitions], color=color,
                    label=f"{'P_T' if phase == 'prefill' else 'B_d'}={size} KV={kv:,}")
            ax.plot([m.total_sms], [m.predict(phase, size, kv, m.total_sms)], "*", color=color, ms=10)
            for s in profile.samples:
                if (s.phase, s.part, s.size, s.kv, s.prefill_tokens) == (phase, "all", size, kv, 0):
                    ax.plot(s.sms, s.ms, "x" if s.holdout else "o", color=color, mfc="none")
            sat = m.saturation_sms(phase, size, kv, reference_sms=_largest_side(m, phase))
            ax.plot([sat], [m.predict(phase, size, kv, sat)], "v", color=color, ms=9)
        ax.set(title=f"{phase} ({profile.model['name']}, {profile.gpu['slug']})", xlabel="SMs",
               ylabel="step latency (ms)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="line: fit, o/x: measured/held out, *: whole GPU, v: within 5% of the largest partition",
                  title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load(path: str) -> Profile | None:
    """The profile, or None after reporting why it cannot be read."""
    from nexus_tune.commands.cli import report_error

    try:
        return Profile.load(path)
    except ProfileError as e:
        report_error(str(e))
        return None


def _cv_settings(args: Any) -> tuple[int, int]:
    """--folds and --seed, the library's defaults where not given."""
    return args.folds or FOLDS, SEED if args.seed is None else args.seed


def run_check(args: Any) -> int:
    """Cross-validate the profile's model (as set up: heads) on its samples; 1 when a group misses the targets."""
    from rich.console import Console

    profile = _load(args.path)
    if profile is None:
        return 2
    folds, seed = _cv_settings(args)
    summary = cross_validate(profile.samples, profile.latency_model, folds, seed).summary()
    Console().print(cv_table(summary, f"{profile.model['name']} on {profile.gpu['slug']}: cross-validated error"))
    return 0 if meets_targets(summary) else 1


def model_heads(profile: Profile) -> int | None:
    """The profile's model's query heads: its latency model's, else the engine's preset or checkpoint
    config of that name (None when neither is known here)."""
    if profile.latency_model.attention_heads:
        return profile.latency_model.attention_heads
    from nexus_tune.engine.config import PRESETS, ConfigError, ModelConfig, get_preset

    name = profile.model["name"]
    try:
        if name in PRESETS:
            return get_preset(name).num_attention_heads
        return ModelConfig.from_pretrained(name).num_attention_heads if Path(name).is_dir() else None
    except (ConfigError, OSError, ValueError):
        return None


def run_refit(args: Any) -> int:
    """Refit the latency model from the stored samples; write the profile (to --out, else in place)."""
    from rich.console import Console

    console = Console()
    profile = _load(args.path)
    others = [_load(path) for path in args.add_samples]
    if profile is None or None in others:
        return 2
    try:
        pooled = profile.with_samples_of(others)
    except ProfileError as e:
        from nexus_tune.commands.cli import report_error

        report_error(str(e))
        return 2
    folds, seed = _cv_settings(args)
    stored = profile.cross_validation
    before = (stored if stored and (stored["folds"], stored["seed"]) == (folds, seed)
              else cross_validate(profile.samples, profile.latency_model, folds, seed).summary())
    heads = args.attention_heads or model_heads(profile)
    refitted = pooled.refit(heads, folds, seed)
    if others:
        console.print(f"fitted on {len(pooled.samples)} samples: {len(profile.samples)} of {args.path} and "
                      f"{len(pooled.samples) - len(profile.samples)} of {', '.join(args.add_samples)}")
    console.print(cv_comparison(before, refitted.cross_validation))
    console.print(cv_table(refitted.cross_validation, "After the refit"))
    if not heads:
        console.print("[yellow]the model's query heads are unknown here (--attention-heads N): fitted without waves[/]")
    if profile.step_overhead is not None:
        console.print("step_overhead kept as fitted against the previous model; to refit it on the new one: "
                      "nexus-tune calibrate --profile FILE --from-runs DIR")
    console.print(f"wrote {refitted.save(args.out or args.path)}")
    return 0


def run_show(args: Any) -> int:
    from rich.console import Console

    console = Console()
    profile = _load(args.path)
    if profile is None:
        return 2
    for table in summary_tables(profile):
        console.print(table)
    if args.plot:
        console.print(f"wrote {plot_profile(profile, args.plot)}")
    return 0
