"""Cross-validated error of the latency model over a profile's samples (issue 17).

The profiler's held-out points are few and fixed in advance, inside the grid: interior SM counts
and mid-range sizes. K-fold cross-validation holds out every measured point once instead,
the smallest and largest sizes and the SM counts at both ends included:

    cv = cross_validate(profile.samples, profile.latency_model)   # FOLDS folds, SEED
    cv.summary()  # {"folds", "seed", "groups": {"prefill": {"mape_pct", "max_pct", "n", "worst"}, ...}}

A point is one measured configuration (phase, size, KV, SMs, and the prefill beside a decode
step); all its parts (attention, dense, whole step) are held out together, or the parts would
tell the fit what the held-out whole step measured. Points are dealt to folds at random within
each group (prefill, decode, contention), so that every fold holds some of each: the contention
fit has a dozen points, and a fold without any would score what no fit could predict. Each fold
fits a fresh model on the others' samples, as the profiler fits (parts included), and scores
the whole steps it held out with the fitted curve (no online correction).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexus_tune.core.latency_model import LatencyModel, Sample, error_stats

FOLDS = 5
SEED = 0
# The issue-17 targets, per group: held-out MAPE and the worst held-out point (%).
TARGET_MAPE_PCT = 5.0
TARGET_WORST_PCT = 15.0
GROUPS = ("prefill", "decode", "contention")

Fit = Callable[[list[Sample]], LatencyModel]
Map = Callable[..., Iterable[LatencyModel]]  # builtin map, or a process pool's (folds fitted in parallel)


@dataclass(frozen=True)
class PointError:
    """One held-out whole step: what it measured and what the fold's model predicted."""

    sample: Sample
    predicted_ms: float
    fold: int

    @property
    def error_pct(self) -> float:
        """Signed: positive when the model predicts a slower step than was measured."""
        return 100 * (self.predicted_ms - self.sample.ms) / self.sample.ms

    def to_dict(self) -> dict[str, Any]:
        s = self.sample
        return {"phase": s.phase, "size": s.size, "kv": s.kv, "sms": s.sms, "prefill_tokens": s.prefill_tokens,
                "prefill_kv": s.prefill_kv, "ms": round(s.ms, 4), "predicted_ms": round(self.predicted_ms, 4),
                "error_pct": round(self.error_pct, 2)}


def describe_point(p: dict[str, Any]) -> str:
    """A point (PointError.to_dict) in words: "512 tokens over 8192 KV on 56 SMs"."""
    if p["phase"] == "prefill":
        what = f"{p['size']} tokens over {p['kv']} KV"
    else:
        what = f"{p['size']} seqs, {p['kv']} KV"
    beside = ""
    if p.get("prefill_tokens"):
        beside = f" beside a {p['prefill_tokens']}-token prefill" + (f" over {p['prefill_kv']} KV" if p["prefill_kv"] else "")
    return f"{what} on {p['sms']} SMs{beside}"


def assign_folds(samples: Iterable[Sample], folds: int = FOLDS, seed: int = SEED) -> dict[tuple, int]:
    """Sample.point -> fold: each group's points shuffled and dealt in turn, the deal running on
    from one group to the next so that small groups do not all land in the first folds."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {folds}")
    by_group: dict[str, set[tuple]] = {}
    for s in samples:
        by_group.setdefault(s.group, set()).add(s.point)
    rng, fold_of, dealt = random.Random(seed), {}, 0
    for group in sorted(by_group):
        points = sorted(by_group[group])
        rng.shuffle(points)
        for point in points:
            fold_of[point] = dealt % folds
            dealt += 1
    return fold_of


@dataclass
class CrossValidation:
    folds: int
    seed: int
    points: list[PointError]  # every held-out whole step, each exactly once
    models: list[LatencyModel] = field(default_factory=list, repr=False)  # each fold's fit (the sweep's committee)

    def groups(self) -> dict[str, dict[str, Any]]:
        """Per group (GROUPS order): error_stats of |error| and the worst point."""
        out = {}
        for group in GROUPS:
            mine = [p for p in self.points if p.sample.group == group]
            if mine:
                worst = max(mine, key=lambda p: abs(p.error_pct))
                out[group] = error_stats([abs(p.error_pct) / 100 for p in mine]) | {"worst": worst.to_dict()}
        return out

    def summary(self) -> dict[str, Any]:
        """Plain data, as a profile stores it (`cross_validation`)."""
        return {"folds": self.folds, "seed": self.seed, "groups": self.groups()}


def meets_targets(summary: dict[str, Any]) -> bool:
    """Whether every group of a summary is within TARGET_MAPE_PCT and TARGET_WORST_PCT."""
    return all(g["mape_pct"] <= TARGET_MAPE_PCT and g["max_pct"] <= TARGET_WORST_PCT
               for g in summary["groups"].values())


def cross_validate(samples: Sequence[Sample], model: LatencyModel | None, folds: int = FOLDS, seed: int = SEED,
                   fit: Fit | None = None, map_: Map = map) -> CrossValidation:
    """K-fold cross-validation over every point of `samples`, the profiler's held-out ones included,
    of `fit` (default: a fresh model set up as `model`, fitted as the profiler fits it). The folds are
    fitted through `map_`: a process pool's map fits them in parallel (then `fit` must pickle)."""
    fit = fit or (lambda train: model.fresh().fit(train))
    fold_of = assign_folds(samples, folds, seed)
    held = {f: [s for s in samples if fold_of[s.point] == f] for f in range(folds)}
    held = {f: mine for f, mine in held.items() if mine}  # fewer points than folds
    models = list(map_(fit, [[s for s in samples if fold_of[s.point] != f] for f in held]))
    points = [PointError(s, m.sample_ms(s), f) for (f, mine), m in zip(held.items(), models)
              for s in mine if s.part == "all"]
    return CrossValidation(folds, seed, points, models)
