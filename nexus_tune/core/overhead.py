"""What an engine step costs beyond the profile's kernel time, fitted from the engine's step log.

The profiler times each phase's kernels alone: a graph replayed from an idle stream, inputs ready.
A step of the running engine also builds its inputs on the host (block tables, positions), copies
them up, samples, hands the tokens to their requests and schedules the next step, all while the
other loop's thread and the server hold the GIL. On the H100 that made decode steps 1.2-1.55x the
profile's prediction while prefill agreed within 10% (docs/results.md), and the simulator's mean
TPOT 20-50% low. `StepOverhead` closes that gap, scikit-learn style:

    overhead = StepOverhead().fit(step_logs, profile.latency_model)  # one list of step records per run
    cycle_ms = overhead.predict("decode/decode", predicted_gpu_ms, num_seqs)

Per step key "<loop>/<kind>" (nexus_tune/engine/loops.py: loop prefill|decode|mixed|single, kind
prefill|decode|mixed), a loop's cycle (one step's start to the next one's) is modelled as

    cycle_ms = scale * predicted_ms + fixed_ms + per_seq_ms * num_seqs

with non-negative terms fitted by least squares on relative errors (a 10 ms step's miss counts as
much as a 200 ms step's, as the 8% target reads them). The target is the step's measured GPU span (from
its start event, so host work before the launch counts) plus the host gap to the loop's next step;
a gap longer than GAP_IDLE x the key's median gap is the loop waiting for work, not working, and
counts as the median. Keys with fewer than `min_steps` steps stay unfitted: their cycle is the
prediction. `nexus-tune calibrate` (nexus_tune/commands/calibrate.py) fits one from engine runs and
writes it into the profile, where the simulator uses it.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares, nnls

from nexus_tune.core.latency_model import Correction, LatencyModel, chunk_prefix

GAP_IDLE = 3.0  # a gap this many times the key's median: the loop was idle, not busy
IDENTITY = (1.0, 0.0, 0.0)


def step_key(loop: str, kind: str) -> str:
    return f"{loop}/{kind}"


def step_gpu_ms(model: LatencyModel, kind: str, sms: int, prefill_tokens: int = 0, prefill_kv: int = 0,
                decode_seqs: int = 0, decode_kv: int = 0, beside_prefill: int = 0, beside_prefill_kv: int = 0,
                beside_decode: int = 0) -> float:
    """The profile's kernel time of one engine step: kind prefill | decode | mixed (a chunked step);
    a decode step of the two-loop policies runs beside a prefill of `beside_prefill` tokens, a prefill
    step beside `beside_decode` decoding sequences."""
    if kind == "prefill":
        return model.predict_prefill(prefill_tokens, prefill_kv, sms, beside_decode > 0)
    if kind == "decode":
        return model.predict_decode(decode_seqs, decode_kv, sms, beside_prefill, beside_prefill_kv)
    return model.predict_mixed(prefill_tokens, prefill_kv, decode_seqs, decode_kv, sms)


def record_prefix(record: Mapping[str, Any]) -> int:
    """The prefix a step record's prompt chunks are priced at: from their causal pairs (chunk_prefix),
    or, in records saved before steps carried their pairs, the summed prefix."""
    if record.get("prefill_pairs"):
        return chunk_prefix(record["prefill_tokens"], record["prefill_pairs"])
    return record["prefill_kv"]


def predicted_gpu_ms(record: Mapping[str, Any], model: LatencyModel) -> float:
    """step_gpu_ms of a step record (a dict of engine.loops.StepRecord's fields; with_beside_decode
    fills in `beside_decode` for logs saved before the prefill loop recorded it)."""
    return step_gpu_ms(model, record["kind"], record["sms"], record["prefill_tokens"], record_prefix(record),
                       record["decode_seqs"], record["decode_kv"], record["beside_prefill"],
                       record["beside_prefill_kv"], record.get("beside_decode", 0))


def _needs_beside_decode(r: Mapping[str, Any]) -> bool:
    return r["loop"] == "prefill" and "beside_decode" not in r and r.get("end_ms") is not None


def with_beside_decode(log: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One run's step records, each prefill-loop step that lacks `beside_decode` (logs saved before the
    loop recorded it) given 1 where the decode loop's steps cover over half of its span, else 0."""
    log = list(log)
    if not any(map(_needs_beside_decode, log)):
        return log
    # One loop's steps follow each other on its stream: their spans are ordered and apart.
    decode = sorted((r["start_ms"], r["end_ms"]) for r in log
                    if r["loop"] == "decode" and r.get("start_ms") is not None and r.get("end_ms") is not None)
    ends = [b for _, b in decode]

    def covered(start: float, end: float) -> float:
        total, i = 0.0, bisect.bisect_right(ends, start)  # the first decode step still running at `start`
        while i < len(decode) and decode[i][0] < end:
            total += min(end, decode[i][1]) - max(start, decode[i][0])
            i += 1
        return total / max(end - start, 1e-9)

    return [dict(r, beside_decode=int(covered(r["start_ms"], r["end_ms"]) > 0.5)) if _needs_beside_decode(r) else r
            for r in log]


def prefill_slowdowns(step_logs: Iterable[Iterable[Mapping[str, Any]]], model: LatencyModel
                      ) -> Iterator[tuple[Mapping[str, Any], float]]:
    """Each timed two-loop prefill step (`beside_decode` filled in) and its GPU time over the profile's
    prediction for it alone."""
    for log in step_logs:
        for r in with_beside_decode(log):
            if r["loop"] == "prefill" and r["kind"] == "prefill" and r.get("gpu_ms") and not r.get("failed"):
                yield r, r["gpu_ms"] / model.predict_prefill(r["prefill_tokens"], record_prefix(r), r["sms"])


def fit_prefill_contention(step_logs: Iterable[Iterable[Mapping[str, Any]]], model: LatencyModel) -> float:
    """LatencyModel.prefill_contention_ from the two-loop prefill steps of `step_logs` that ran beside a
    decode: least squares of log(GPU time / the profile's prefill alone) = log(1 + c * decode SMs / all
    SMs). The profile is taken as right about prefill alone (H200: those steps ran 0.99-1.04x it); what
    is left, either way, is StepOverhead's to fit. 0 when no step ran beside a decode."""
    share, log_ratio = [], []
    for r, slowdown in prefill_slowdowns(step_logs, model):
        if r.get("beside_decode") and r["sms"] < model.total_sms:
            share.append((model.total_sms - r["sms"]) / model.total_sms)
            log_ratio.append(math.log(slowdown))
    if not share:
        return 0.0
    x, y = np.array(share), np.array(log_ratio)
    fit = least_squares(lambda c: np.log1p(c[0] * x) - y, [0.5], bounds=([0.0], [10.0]))
    return float(fit.x[0])


def step_cycles(step_logs: Iterable[Iterable[Mapping[str, Any]]]) -> list[tuple[Mapping[str, Any], float]]:
    """(record, measured cycle ms) for every usable step: GPU span plus the gap to its loop's next step.
    Each step log is one run of one engine: its times share one clock, another run's do not."""
    gaps: dict[str, list[tuple[Mapping[str, Any], float]]] = {}
    for log in map(with_beside_decode, step_logs):
        by_loop: dict[str, list[Mapping[str, Any]]] = {}
        for r in log:
            if r.get("gpu_ms") is not None and r.get("start_ms") is not None and not r.get("failed"):
                by_loop.setdefault(r["loop"], []).append(r)
        for steps in by_loop.values():
            steps.sort(key=lambda r: r["start_ms"])
            for r, nxt in zip(steps, steps[1:]):
                gap = max(nxt["start_ms"] - r["end_ms"], 0.0)
                gaps.setdefault(step_key(r["loop"], r["kind"]), []).append((r, gap))
    out = []
    for pairs in gaps.values():
        typical = statistics.median(g for _, g in pairs)
        out += [(r, r["gpu_ms"] + (g if g <= GAP_IDLE * typical else typical)) for r, g in pairs]
    return out


def _mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / y) * 100)


@dataclass
class StepOverhead:
    """Per step key: (scale, fixed_ms, per_seq_ms). Unfitted keys: the prediction unchanged."""

    terms: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # per key: steps fitted, MAPE of the bare prediction and of the fitted cycle against the measured one
    fit_error: dict[str, dict[str, float]] = field(default_factory=dict)

    def fit(self, step_logs: Iterable[Iterable[Mapping[str, Any]]], model: LatencyModel,
            min_steps: int = 30) -> StepOverhead:
        """Fit on `step_logs`: one list of step records (engine.loops.StepRecord fields) per engine run."""
        rows: dict[str, list[tuple[float, int, float]]] = {}
        for r, cycle in step_cycles(step_logs):
            rows.setdefault(step_key(r["loop"], r["kind"]), []).append(
                (predicted_gpu_ms(r, model), r["num_seqs"], cycle))
        self.terms, self.fit_error = {}, {}
        for key, data in sorted(rows.items()):
            if len(data) < min_steps:
                continue
            a = np.array(data, dtype=float)
            x = np.column_stack([a[:, 0], np.ones(len(a)), a[:, 1]])
            # Relative least squares (each step's error over its cycle): steps of 10 and 200 ms count alike.
            coef, _ = nnls(x / a[:, 2:3], np.ones(len(a)))
            self.terms[key] = (float(coef[0]), float(coef[1]), float(coef[2]))
            self.fit_error[key] = {"steps": len(a), "profile_mape_pct": _mape(a[:, 0], a[:, 2]),
                                   "fitted_mape_pct": _mape(x @ coef, a[:, 2])}
        return self

    def predict(self, key: str, gpu_ms: float, num_seqs: int) -> float:
        """A loop's cycle for a step the profile predicts at `gpu_ms`."""
        scale, fixed, per_seq = self.terms.get(key, IDENTITY)
        return scale * gpu_ms + fixed + per_seq * num_seqs

    def to_dict(self) -> dict[str, Any]:
        return {"terms": {k: list(v) for k, v in self.terms.items()}, "fit_error": self.fit_error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepOverhead:
        terms = {}
        for key, value in d["terms"].items():
            scale, fixed, per_seq = (float(v) for v in value)
            if min(scale, fixed, per_seq) < 0:
                raise ValueError(f"step_overhead term {key} has a negative coefficient: {value}")
            terms[key] = (scale, fixed, per_seq)
        return cls(terms, {k: dict(v) for k, v in d.get("fit_error", {}).items()})


FIDELITY_WITHIN = 0.08  # issue 17: engine steps predicted within 8% per step kind


def _error_stats(predicted: np.ndarray, measured: np.ndarray, within: float) -> dict[str, float]:
    """Median signed error (bias), median and p90 of |error| (%), and the share within `within` (%)."""
    rel = (predicted - measured) / measured
    return {"bias_pct": 100 * float(np.median(rel)), "median_pct": 100 * float(np.median(np.abs(rel))),
            "p90_pct": 100 * float(np.percentile(np.abs(rel), 90)), "within_pct": 100 * float(np.mean(np.abs(rel) <= within))}


def step_predictions(step_logs: Iterable[Iterable[Mapping[str, Any]]], model: LatencyModel,
                     overhead: StepOverhead | None = None) -> dict[str, np.ndarray]:
    """Per step key, one row per step: (kernel time the latency model predicts, the step's GPU time,
    the cycle predicted through `overhead`, the loop's measured cycle), in ms."""
    overhead = overhead or StepOverhead()
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for r, cycle in step_cycles(step_logs):
        key = step_key(r["loop"], r["kind"])
        gpu = predicted_gpu_ms(r, model)
        rows.setdefault(key, []).append((gpu, r["gpu_ms"], overhead.predict(key, gpu, r["num_seqs"]), cycle))
    return {key: np.array(data, dtype=float) for key, data in sorted(rows.items())}


def step_fidelity(step_logs: Iterable[Iterable[Mapping[str, Any]]], model: LatencyModel,
                  overhead: StepOverhead | None = None, within: float = FIDELITY_WITHIN) -> dict[str, dict[str, Any]]:
    """Predicted against measured engine steps, per step key: the step's GPU time against the latency
    model's kernel time (`kernel`), and the loop's cycle against that time through `overhead` (`cycle`:
    what the simulator runs on), each as _error_stats."""
    overhead = overhead or StepOverhead()
    return fidelity_of(step_predictions(step_logs, model, overhead), overhead, within)


def fidelity_of(predictions: dict[str, np.ndarray], overhead: StepOverhead,
                within: float = FIDELITY_WITHIN) -> dict[str, dict[str, Any]]:
    """step_fidelity of step_predictions already made (with `overhead`)."""
    return {key: {"steps": len(a), "fitted": key in overhead.terms,
                  "kernel": _error_stats(a[:, 0], a[:, 1], within), "cycle": _error_stats(a[:, 2], a[:, 3], within)}
            for key, a in predictions.items()}


def fidelity_table(fidelity: dict[str, dict[str, Any]], title: str, within: float = FIDELITY_WITHIN) -> Any:
    """A rich table of step_fidelity: per step key, |error| median / p90 and the share within `within`."""
    from rich.table import Table

    table = Table(title=title)
    cols = ["loop/kind", "steps", "kernel bias", "kernel |err| median / p90", f"kernel within {within:.0%}",
            "cycle |err| median / p90", f"cycle within {within:.0%}"]
    for col in cols:
        table.add_column(col, justify="left" if col == "loop/kind" else "right", no_wrap=col == "loop/kind")
    for key, f in fidelity.items():
        k, c = f["kernel"], f["cycle"]
        table.add_row(key + ("" if f["fitted"] else " (unfitted)"), str(f["steps"]), f"{k['bias_pct']:+.1f}%",
                      f"{k['median_pct']:.1f}% / {k['p90_pct']:.1f}%", f"{k['within_pct']:.0f}%",
                      f"{c['median_pct']:.1f}% / {c['p90_pct']:.1f}%", f"{c['within_pct']:.0f}%")
    table.caption = ("kernel: the profile's prediction against the step's GPU time (bias: median signed error); "
                     "cycle: through the step overhead, against the loop's cycle (GPU span and gap to its next step)")
    return table


# The step keys of the two-loop policies' loops (nexus_tune/engine/loops.py), by phase.
TWO_LOOP_KEYS = {"prefill": step_key("prefill", "prefill"), "decode": step_key("decode", "decode")}
RECENT_STEPS = 32  # StepTimes.recent_decode_ms_ averages over about this many decode steps


class StepTimes:
    """The step times the controller plans with, and what the engine feeds back.

    A two-loop step's cycle: the latency model's curve under its online correction (kernel time),
    through the profile's StepOverhead (host work around it), under a second online correction,
    of the cycle, learned when the loop reports its cycles (without either: kernel time alone).
    Both corrections are shared by every SM count (latency_model's docstring says why). The
    curve changes only with a refit, so the controller caches `curve_ms` and applies `cycle_ms`
    (a few multiplications) on every use: an online update leaves its cache valid.

    `update` takes LatencyModel.update's arguments and, optionally, the loop's cycle; it keeps
    `recent_decode_ms_`, the mean decode cycle over about RECENT_STEPS steps (exponentially
    weighted; None before the first), which the controller's TBT guard watches.
    """

    def __init__(self, model: LatencyModel, overhead: StepOverhead | None = None):
        self.model = model
        self.overhead = overhead or StepOverhead()
        self.cycle_corrections_ = {phase: Correction() for phase in TWO_LOOP_KEYS}
        self.recent_decode_ms_: float | None = None

    def curve_ms(self, phase: str, size: float, kv: float, sms: int, prefill_tokens: float = 0,
                 prefill_kv: float = 0, beside_decode: bool = False) -> float:
        return self.model.curve_ms(phase, size, kv, sms, prefill_tokens, prefill_kv, beside_decode)

    def cycle_ms(self, phase: str, curve_ms: float, size: float) -> float:
        """A loop's cycle for a step of `size` (prefill: tokens; decode: sequences) whose curve
        predicts `curve_ms`."""
        return self.cycle_corrections_[phase].apply(self._host(phase, self.model.correct(phase, curve_ms, size), size),
                                                    size)

    def _host(self, phase: str, kernel_ms: float, size: float) -> float:
        """The profile's StepOverhead around a kernel time (a prefill step counted as one sequence:
        the controller plans chunks, not prompts)."""
        return self.overhead.predict(TWO_LOOP_KEYS[phase], kernel_ms, 1 if phase == "prefill" else size)

    def predict_prefill(self, tokens: float, kv_prefix: float, sms: int, beside_decode: bool = False) -> float:
        return self.cycle_ms("prefill", self.curve_ms("prefill", tokens, kv_prefix, sms, beside_decode=beside_decode),
                             tokens)

    def predict_decode(self, batch: float, kv_tokens: float, sms: int, prefill_tokens: float = 0,
                       prefill_kv: float = 0) -> float:
        return self.cycle_ms("decode", self.curve_ms("decode", batch, kv_tokens, sms, prefill_tokens, prefill_kv),
                             batch)

    def update(self, phase: str, size: float, kv: float, sms: int, observed_ms: float, prefill_tokens: float = 0,
               prefill_kv: float = 0, cycle_ms: float | None = None, beside_decode: bool = False) -> float:
        """LatencyModel.update with the step's kernel time `observed_ms` (returns the kernel time it
        predicted). `cycle_ms`: the loop's whole cycle for the step (its schedule call to the end of
        its bookkeeping), when the loop measures it: the host work beyond the profile's StepOverhead
        is then learned too, and the TBT guard watches real cycles rather than predicted host work."""
        if cycle_ms is not None and not (cycle_ms > 0 and math.isfinite(cycle_ms)):
            raise ValueError(f"cycle_ms must be a positive finite number, not {cycle_ms!r}")
        predicted = self.model.update(phase, size, kv, sms, observed_ms, prefill_tokens, prefill_kv, beside_decode)
        host = self._host(phase, observed_ms, size)
        if cycle_ms is not None:
            self.cycle_corrections_[phase].add(host, size, cycle_ms)
        if phase == "decode":
            cycle = host if cycle_ms is None else cycle_ms
            last = self.recent_decode_ms_
            self.recent_decode_ms_ = cycle if last is None else last + (cycle - last) / RECENT_STEPS
        return predicted


def overhead_table(overhead: StepOverhead, title: str) -> Any:
    """A rich table of the fitted terms and their error (`profile show`, `calibrate`)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("loop/kind", "steps", "scale", "fixed ms", "per seq ms", "profile MAPE", "fitted MAPE"):
        table.add_column(col, justify="left" if col == "loop/kind" else "right", no_wrap=col == "loop/kind")
    for key, (scale, fixed, per_seq) in overhead.terms.items():
        err = overhead.fit_error.get(key, {})
        table.add_row(key, str(err.get("steps", "?")), f"{scale:.3f}", f"{fixed:.3f}", f"{per_seq:.4f}",
                      *(f"{err[k]:.1f}%" if k in err else "?" for k in ("profile_mape_pct", "fitted_mape_pct")))
    return table
