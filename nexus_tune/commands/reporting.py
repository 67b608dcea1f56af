"""What the commands show while they run and after: a progress bar, latency against arrival rate
per policy (bench --sweep, plan, tune), and engine steps measured against predicted (calibrate --plot).
"""
from __future__ import annotations
from pathlib import Path
from typing import Any
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

def plot_latency_vs_rate(series: dict[str, list[tuple[float, dict]]], slos: dict[str, float], path: str,
                         capacities: dict[str, float | None] | None = None) -> None:
    """Median and p99 TTFT and TPOT against request rate, one line pair per series, SLOs dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, name, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for i, (key, points) in enumerate(series.items()):
            rates = [rate for rate, _ in points]
            color = f"C{i}"
            ax.plot(rates, [s[f"median_{name}_ms"] for _, s in points], "o-", color=color, label=f"{key} median")
            ax.plot(rates, [s[f"p99_{name}_ms"] for _, s in points], "s--", color=color, alpha=0.6,
                    label=f"{key} p99")
            cap = (capacities or {}).get(key)
            if cap is not None:
                ax.axvline(cap, color=color, linestyle=":", alpha=0.8)
        if name in slos:
            ax.axhline(slos[name], color="black", linestyle="--", linewidth=1, label=f"SLO {slos[name]:g} ms")
        ax.set_title(f"{label.split()[0]} against request rate (dotted: capacity)")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_step_fidelity(predictions: dict[str, Any], path: str, within: float) -> None:
    """Measured against predicted loop cycles, one panel per step kind (log-log; the diagonal and the
    band of +-`within` around it): what `calibrate` fitted, step by step."""
    import math

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    cols = min(3, len(predictions))
    rows = math.ceil(len(predictions) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), layout="constrained")
    for ax, (key, a) in zip(fig.subplots(rows, cols, squeeze=False).flat, predictions.items()):
        predicted, measured = a[:, 2], a[:, 3]
        lo, hi = min(predicted.min(), measured.min()), max(predicted.max(), measured.max())
        line = [lo, hi]
        ax.scatter(predicted, measured, s=4, alpha=0.3)
        ax.plot(line, line, color="black", linewidth=1)
        for factor in (1 - within, 1 + within):
            ax.plot(line, [v * factor for v in line], color="black", linestyle=":", linewidth=1)
        inside = float((abs(predicted - measured) / measured <= within).mean() * 100)  # as step_fidelity counts
        ax.set(xscale="log", yscale="log", xlabel="predicted cycle (ms)", ylabel="measured cycle (ms)",
               title=f"{key}: {len(a)} steps, {inside:.0f}% within {within:.0%}")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, at 1-2-5 steps: every panel gets labels, none collide
            axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(FormatStrFormatter("%g"))
    for ax in list(fig.axes)[len(predictions):]:
        ax.set_visible(False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def progress_bar(console: Console) -> Progress:
    """The bar bench, tune and plan show: what runs, how many of how many, time so far."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
