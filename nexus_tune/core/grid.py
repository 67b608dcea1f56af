"""Which points `nexus-tune profile` times, and a roofline estimate of each (pure Python).

The profiler runs an adaptive sweep (`SWEEPS`, `AdaptiveSweep`, `adaptive_sweep`): a coarse pass over
the grid's ends plus random held-out points, then rounds that spend the rest of a time budget where
the fit so far is least sure: where the training fit and the k-fold fits disagree, or where measured
neighbours are mispredicted out of fold (the curve bends). The decisions are pure (a test's fake GPU
answers them as well as commands/profiler.py does); `fit_and_validate` is the one fit of a sweep's
samples, the profiler's and `Profile.refit`'s. Points come from a pool (every side of every split,
sizes between the ends); one whose single run is estimated above the limit, or that needs more KV
than the cache holds, is left out. The estimate (`RooflineCost`, rescaled by pilot steps on the GPU)
prices each point for the budget and the progress bar; nothing is fitted on it.

The fixed grids (`plan_grid`: FULL, QUICK) are what synthetic profiles (core/testing.py) sample and
what the adaptive sweep is checked against (tests/test_grid_adaptive.py). H100: prefill sides
8..120 SMs, decode sides 124..12:
- full: 11 of the 15 SM counts per phase + the whole GPU; prefill P_T 128/512/2048/8192 x KV_p
  0/8192, decode B_d 1/8/32/128/256 x 512/4096 KV tokens per sequence, each as attention, dense and
  whole step; held out: the other 4 SM counts x 3 off-grid sizes per phase; contention at 3 splits
  x 4 prefills (+2 held out). Runs estimated above 1 s are left out.
- quick: 5 SM counts + the whole GPU; P_T 256/1024/4096 x KV_p 0/8192; B_d 1/16/64/256 x
  512/4096; held out: 2 SM counts x 2 sizes per phase; contention at 2 splits x 3 prefills (+1
  held out); runs above 0.4 s left out.
"""
from __future__ import annotations
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
import numpy as np
from nexus_tune.core.crossval import (FOLDS, GROUPS, SEED, TARGET_MAPE_PCT, TARGET_WORST_PCT, CrossValidation, Map,
                                      cross_validate)
from nexus_tune.core.latency_model import PARTS, PHASES, LatencyModel, Sample, share

WARMUP = 1
CONTENDED_STEPS = 8  # decode steps timed inside one prefill window
# Host time per point outside the timed runs, until the pilot measures it: random inputs of a
# prefill; a decode graph's warm-up run and capture (two eager forwards, ~22 ms each for 8B).
PREP_S = 0.02
CAPTURE_S = 0.15
# Pilot steps on the whole GPU: warm-up and roofline calibration.
PILOT_PREFILL = (2048, 0)
PILOT_DECODE = (64, 64 * 1024)
PARTITION_PENALTY = 1 / 0.85

# Estimate of (phase, part, size, kv, sms) -> ms of one run.
Cost = Callable[[str, str, int, int, int], float]


@dataclass(frozen=True)
class GridSpec:
    name: str
    train_sms: int  # SM counts per phase the fit sees (plus the whole GPU)
    holdout_sms: int  # further SM counts, for held-out points only
    prefill: tuple[tuple[int, int], ...]  # (P_T, KV_p)
    decode: tuple[tuple[int, int], ...]  # (B_d, KV tokens per sequence)
    holdout_prefill: tuple[tuple[int, int], ...]
    holdout_decode: tuple[tuple[int, int], ...]
    # Prefill share of the splits timed under contention; 1.0: the largest split, whose small decode
    # side the controller picks under prefill-heavy load (a stretch fitted only on middle splits was
    # extrapolated there: docs/performance.md, 2026-12-02).
    contention_splits: tuple[float, ...]
    contention_prefill: tuple[tuple[int, int], ...]
    contention_decode: tuple[tuple[int, int], ...]
    holdout_contention: tuple[tuple[float, tuple[int, int], tuple[int, int]], ...]  # (share, prefill, decode)
    max_run_ms: float  # points whose single run is estimated above this are left out


def _product(a: Sequence[int], b: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((x, y) for x in a for y in b)


FULL = GridSpec(
    name="full", train_sms=11, holdout_sms=4,
    prefill=_product((128, 512, 2048, 8192), (0, 8192)),
    decode=_product((1, 8, 32, 128, 256), (512, 4096)),
    holdout_prefill=((256, 2048), (1024, 0), (4096, 4096)),
    holdout_decode=((4, 2048), (64, 2048), (192, 1024)),
    contention_splits=(0.25, 0.5, 0.75),
    contention_prefill=((512, 0), (2048, 0), (2048, 8192), (8192, 0)),
    contention_decode=((64, 2048),),
    holdout_contention=((0.375, (1024, 4096), (32, 2048)), (0.625, (4096, 0), (128, 1024))),
    max_run_ms=1000.0,
)
QUICK = GridSpec(
    name="quick", train_sms=5, holdout_sms=2,
    prefill=_product((256, 1024, 4096), (0, 8192)),
    decode=_product((1, 16, 64, 256), (512, 4096)),
    holdout_prefill=((512, 2048), (2048, 0)),
    holdout_decode=((8, 2048), (128, 1024)),
    contention_splits=(0.25, 0.75),
    contention_prefill=((512, 0), (2048, 0), (2048, 8192)),
    contention_decode=((64, 2048),),
    holdout_contention=((0.375, (2048, 0), (32, 2048)),),
    max_run_ms=400.0,
)


@dataclass(frozen=True)
class Point:
    """One thing to time; a decode point with prefill_tokens > 0 is timed under that prefill."""

    phase: str
    part: str
    size: int
    kv: int
    sms: int
    prefill_tokens: int = 0
    prefill_kv: int = 0
    holdout: bool = False

    def sample(self, ms: float) -> Sample:
        return Sample(self.phase, self.part, self.size, self.kv, self.sms, ms, self.prefill_tokens,
                      self.prefill_kv, self.holdout)

    @property
    def config(self) -> tuple:
        """What is run, whatever the part: Sample.point of its samples."""
        return (self.phase, self.size, self.kv, self.sms, self.prefill_tokens, self.prefill_kv)


def repeats(est_ms: float) -> int:
    """Timed runs after warm-up: more for short steps, whose medians are noisier; long steps vary
    by well under 1% and dominate the sweep's time."""
    return 5 if est_ms < 50 else 3 if est_ms < 250 else 2


@dataclass
class Plan:
    name: str
    points: list[Point]
    run_ms: list[float]  # estimated single run of each point
    prefill_ms: list[float]  # estimated run of the concurrent prefill of a contention point (else 0)
    dropped: int = 0  # grid points left out: too slow, or more KV than the cache holds
    prep_s: float = PREP_S  # host time to prepare a prefill point
    capture_s: float = CAPTURE_S  # host time to prepare and capture a decode graph

    def point_seconds(self, i: int) -> float:
        """Estimated wall time of timing point i: warm-up, repeats, graph capture, contention window."""
        p, ms = self.points[i], self.run_ms[i]
        if p.prefill_tokens:
            prefill_ms = self.prefill_ms[i]
            window = contention_window_ms(prefill_ms, ms)
            return (2 * prefill_ms + ms + window) / 1e3 + self.capture_s + self.prep_s
        runs = WARMUP + repeats(ms)
        return runs * ms / 1e3 + (self.capture_s if p.phase == "decode" else self.prep_s)

    def seconds(self) -> float:
        return sum(self.point_seconds(i) for i in range(len(self.points)))

    def take(self, indexes: Sequence[int], holdout: bool = False) -> Plan:
        """The points at `indexes` (marked held out with `holdout`), with their estimates."""
        return Plan(self.name, [replace(self.points[i], holdout=holdout) for i in indexes],
                    [self.run_ms[i] for i in indexes], [self.prefill_ms[i] for i in indexes],
                    prep_s=self.prep_s, capture_s=self.capture_s)

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.name, self.points + other.points, self.run_ms + other.run_ms,
                    self.prefill_ms + other.prefill_ms, self.dropped + other.dropped, self.prep_s, self.capture_s)

    def describe(self) -> dict[str, Any]:
        solo = [p for p in self.points if not p.prefill_tokens]
        sms = {ph: sorted({p.sms for p in solo if p.phase == ph and not p.holdout}) for ph in PHASES}
        held = sorted({(p.phase, p.sms) for p in solo if p.holdout})
        return {
            "name": self.name, "points": len(self.points),
            "holdout_points": sum(p.holdout for p in self.points), "dropped": self.dropped,
            "estimated_s": round(self.seconds(), 1), "prefill_sms": sms["prefill"], "decode_sms": sms["decode"],
            "holdout_sms": [f"{ph}:{s}" for ph, s in held],
        }


def contention_window_ms(prefill_ms: float, decode_ms: float) -> float:
    """How long the prefill must keep running for CONTENDED_STEPS decode steps (slowed ~1.5x) to fit."""
    return max(prefill_ms, 1.5 * CONTENDED_STEPS * decode_ms + 2 * prefill_ms)


def _spread(values: Sequence[int], n: int) -> list[int]:
    """n values spread evenly over the sorted list, both ends included."""
    values = sorted(values)
    if n >= len(values):
        return values
    return sorted({values[i] for i in np.linspace(0, len(values) - 1, n).round().astype(int)})


def plan_grid(split_sms: Sequence[int], total_sms: int, kv_capacity: int, quick: bool, cost: Cost,
              max_seq_len: int | None = None, prep_s: float = PREP_S, capture_s: float = CAPTURE_S,
              budget_s: float | None = None) -> Plan:
    """The points of a fixed grid (full or quick), training and held-out (disjoint by construction),
    with estimated run times.

    Points that need more KV than the cache holds, or sequences longer than max_seq_len (the
    model's context), are left out (counted in `dropped`). With budget_s, the training SM counts
    are thinned (down to 3 and the whole GPU) until the estimated sweep fits in it.
    """
    return _thinned(QUICK if quick else FULL, split_sms, total_sms, kv_capacity, cost, max_seq_len, prep_s,
                    capture_s, budget_s)


def _thinned(spec: GridSpec, split_sms: Sequence[int], total_sms: int, kv_capacity: int, cost: Cost,
             max_seq_len: int | None, prep_s: float, capture_s: float, budget_s: float | None) -> Plan:
    """spec's plan, its training SM counts thinned (down to 3 and the whole GPU) until it fits budget_s."""
    for n in range(spec.train_sms, 2, -1):
        plan = Plan(spec.name, [], [], [], prep_s=prep_s, capture_s=capture_s)
        _fill(plan, replace(spec, train_sms=n), split_sms, total_sms, kv_capacity, cost, max_seq_len)
        if budget_s is None or plan.seconds() <= budget_s:
            break
    return plan


def _fill(plan: Plan, spec: GridSpec, split_sms: Sequence[int], total_sms: int, kv_capacity: int, cost: Cost,
          max_seq_len: int | None) -> None:
    usable_kv = int(0.9 * kv_capacity)  # the runner's KV cache also holds the step's own new tokens

    def decode_kv(batch: int, ctx: int) -> int:
        return min(batch * ctx, usable_kv)

    sides = {"prefill": sorted(split_sms), "decode": sorted(total_sms - p for p in split_sms)}
    points: list[Point] = []
    for phase in PHASES:
        train = _spread(sides[phase], spec.train_sms)
        # Without spare SM counts (a small GPU), held-out points are off-grid sizes only.
        held = _spread([s for s in sides[phase] if s not in train] or train, spec.holdout_sms)
        grid = spec.prefill if phase == "prefill" else tuple((b, decode_kv(b, c)) for b, c in spec.decode)
        holdout = spec.holdout_prefill if phase == "prefill" else tuple(
            (b, decode_kv(b, c)) for b, c in spec.holdout_decode)
        points += [Point(phase, part, n, kv, s) for s in train + [total_sms] for n, kv in grid for part in PARTS]
        points += [Point(phase, "all", n, kv, s, holdout=True) for s in held for n, kv in holdout]
    if split_sms:
        def split_near(share_: float) -> int:
            return min(split_sms, key=lambda p: (abs(p - share_ * total_sms), p))

        points += [Point("decode", "all", b, decode_kv(b, c), total_sms - split_near(f), pt, pkv)
                   for f in spec.contention_splits for pt, pkv in spec.contention_prefill
                   for b, c in spec.contention_decode]
        points += [Point("decode", "all", b, decode_kv(b, c), total_sms - split_near(f), pt, pkv, holdout=True)
                   for f, (pt, pkv), (b, c) in spec.holdout_contention]

    longest = max_seq_len or math.inf

    def fits(p: Point) -> bool:
        # Decode needs a KV token per sequence; a contended point holds both phases' KV at once.
        seq = -(-p.kv // p.size) + 1 if p.phase == "decode" else p.kv + p.size
        return ((p.kv >= p.size or p.phase == "prefill") and max(seq, p.prefill_kv + p.prefill_tokens) <= longest
                and p.kv + p.size + p.prefill_kv + p.prefill_tokens <= kv_capacity)

    for p in dict.fromkeys(points):  # ordered and unique
        ms = cost(p.phase, p.part, p.size, p.kv, p.sms) if fits(p) else math.inf
        if ms > spec.max_run_ms:
            plan.dropped += 1
            continue
        plan.points.append(p)
        plan.run_ms.append(ms)
        plan.prefill_ms.append(cost("prefill", "all", p.prefill_tokens, p.prefill_kv, total_sms - p.sms)
                               if p.prefill_tokens else 0.0)


def split_samples(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out) samples; refuses a held-out point that was also measured for training."""
    train = [s for s in samples if not s.holdout]
    held = [s for s in samples if s.holdout]
    seen = {s.key for s in train}
    overlap = [s.key for s in held if s.key in seen]
    if overlap:
        raise ValueError(f"held-out points were also trained on: {overlap[:3]}")
    return train, held


# -- the adaptive sweep --------------------------------------------------------------------------
EVERY_SM_COUNT = 1 << 10  # a GridSpec's train_sms that keeps every side of every split


@dataclass(frozen=True)
class SweepSpec:
    """An adaptive sweep: a coarse first pass and random held-out points, then rounds of points
    from the pool where the fit so far is least sure, until the budget is spent."""

    name: str
    budget_s: float  # the whole command: loading, pilot, sweep and fits
    pool: GridSpec  # every point the sweep may time (train_sms: EVERY_SM_COUNT)
    coarse: GridSpec  # the first pass: the pool's ends and a few points between
    rounds: int  # refinement rounds after the first pass
    holdout_share: float  # of the sweep's budget, for random held-out points (never trained on)
    # Groups whose refinement points time every part, as the coarse pass does (a decode part costs a graph
    # capture and pins its class's curve); elsewhere the whole step (a prefill part doubles a long step).
    refine_every_part: tuple[str, ...] = ("decode",)
    coarse_share: float = 0.6  # the first pass's SM counts are thinned until it fits this share


_POOL = GridSpec(
    name="pool", train_sms=EVERY_SM_COUNT, holdout_sms=0,
    prefill=_product((128, 256, 512, 1024, 2048, 4096, 8192), (0, 2048, 8192)),
    decode=_product((1, 4, 8, 16, 32, 64, 128, 256), (512, 1024, 2048, 4096)),
    holdout_prefill=(), holdout_decode=(),
    contention_splits=(0.25, 0.375, 0.5, 0.625, 0.75, 1.0),
    contention_prefill=((512, 0), (1024, 4096), (2048, 0), (2048, 8192), (4096, 0), (8192, 0)),
    contention_decode=((32, 2048), (64, 2048), (128, 1024)),
    holdout_contention=(), max_run_ms=1000.0,
)
_COARSE = GridSpec(
    name="coarse", train_sms=5, holdout_sms=0,
    prefill=_product((128, 1024, 8192), (0, 8192)), decode=_product((1, 32, 256), (512, 4096)),
    holdout_prefill=(), holdout_decode=(),
    contention_splits=(0.25, 0.5, 0.75, 1.0), contention_prefill=((512, 0), (2048, 8192), (4096, 0)),
    contention_decode=((64, 2048),), holdout_contention=(), max_run_ms=1000.0,
)
_QUICK_POOL = replace(_POOL, max_run_ms=400.0)
SWEEPS = {
    "full": SweepSpec("full", budget_s=165.0, pool=_POOL, coarse=_COARSE, rounds=3, holdout_share=0.1),
    "quick": SweepSpec("quick", budget_s=50.0, pool=_QUICK_POOL, rounds=1, holdout_share=0.1, coarse=replace(
        _COARSE, train_sms=3, prefill=((128, 0), (1024, 8192), (4096, 0)),
        decode=((1, 512), (1, 4096), (32, 2048), (256, 512), (256, 4096)),
        contention_splits=(0.25, 1.0), contention_prefill=((512, 0), (4096, 0)), max_run_ms=400.0)),
    # --from: enough to rescale another GPU's model, a quarter of it held out to say how well it did.
    "from": SweepSpec("from", budget_s=45.0, pool=_QUICK_POOL, rounds=1, holdout_share=0.25, coarse=replace(
        _COARSE, train_sms=3, prefill=((128, 0), (2048, 8192)), decode=((1, 512), (32, 4096), (256, 512)),
        contention_splits=(0.25, 0.75), contention_prefill=((2048, 0),), max_run_ms=400.0)),
}
# Choosing refinement points: a point's value is its group's distance from the targets times its
# uncertainty (log units) over its estimated cost ** COST_POWER; each pick damps the value of its
# neighbours by NEIGHBOUR_DAMPING so that one bend does not take a whole round.
COST_POWER = 0.5
NEIGHBOUR_DAMPING = 0.5
NEED_FLOOR = 0.2  # a group within its targets still gets some points
# Held-out points are dealt in this order, over and over: contention points cost the most (a prefill
# window each) and the fewest configurations.
HOLDOUT_DEAL = ("prefill", "decode", "prefill", "decode", "contention")
HOLDOUT_MIN_S = 3.0  # estimated seconds of held-out points however small the budget: a few per group
# A round adds at most this share of the points so far: a fit's time grows with its samples, and the
# profiler keeps back time for the fits still to come (cheap points of a small model would swamp it).
ROUND_GROWTH = 0.5


@dataclass
class Fitted:
    """A fit of the samples so far: the model (training samples), its error on the held-out ones,
    and the k-fold cross-validation over all (with each fold's model)."""

    model: LatencyModel
    fit_error: dict[str, dict[str, float]]
    cv: CrossValidation


def fresh_fit(setup: LatencyModel, train: list[Sample]) -> LatencyModel:
    """The profiler's fit: a fresh model set up as `setup` (module level: a process pool pickles it)."""
    return setup.fresh().fit(train)


def fit_and_validate(fit: Callable[[list[Sample]], LatencyModel], samples: list[Sample], folds: int = FOLDS,
                     seed: int = SEED, map_: Map = map) -> Fitted:
    """`fit` on the training samples, scored on the held-out ones, and k-fold cross-validated over all.
    With a process pool's map, the training fit runs beside the folds."""
    train, held = split_samples(samples)
    model = map_(fit, [train])  # a pool's map submits it now; builtin map runs it at next()
    cv = cross_validate(samples, None, folds, seed, fit, map_)
    model = next(iter(model))
    return Fitted(model, model.errors(held), cv)


def _whole_step(config: tuple) -> Sample:
    phase, size, kv, sms, prefill_tokens, prefill_kv = config
    return Sample(phase, "all", size, kv, sms, 1.0, prefill_tokens, prefill_kv)


def _group(config: tuple) -> str:
    return "contention" if config[4] else config[0]


def _coords(config: tuple) -> tuple:
    """The axes a neighbour differs along: size, KV (per sequence for decode), SMs, the prefill beside."""
    phase, size, kv, sms, prefill_tokens, prefill_kv = config
    return size, kv if phase == "prefill" else round(kv / size), sms, prefill_tokens, prefill_kv


def _line(config: tuple, axis: int) -> tuple:
    """Every configuration along `axis` through `config` has this key."""
    coords = _coords(config)
    return _group(config), axis, coords[:axis] + coords[axis + 1:]


def _need(groups: dict[str, dict[str, Any]]) -> dict[str, float]:
    """How far each group's cross-validated error is from its targets (1: at them)."""
    return {g: max(NEED_FLOOR, e["mape_pct"] / TARGET_MAPE_PCT, e["max_pct"] / TARGET_WORST_PCT)
            for g, e in groups.items()}


class _Neighbours:
    """The nearest measured configuration on either side along each axis, and their out-of-fold errors."""

    def __init__(self, residual: dict[tuple, float]) -> None:
        self.residual = residual
        self.lines: dict[tuple, list[tuple[float, tuple]]] = {}
        for c in residual:
            for axis in range(len(_coords(c))):
                self.lines.setdefault(_line(c, axis), []).append((_coords(c)[axis], c))
        for line in self.lines.values():
            line.sort()

    def misfit(self, config: tuple) -> float:
        """The largest out-of-fold error of the nearest measured neighbours (0: none on any axis)."""
        worst = 0.0
        for axis, value in enumerate(_coords(config)):
            line = self.lines.get(_line(config, axis), [])
            below = [c for v, c in line if v < value][-1:]
            above = [c for v, c in line if v > value][:1]
            worst = max([worst] + [self.residual[c] for c in below + above])
        return worst


class AdaptiveSweep:
    """Which points to time next: a pure decision the profiler's GPU sweep (or a test's fake) follows.

    `first()`: the coarse pass and random held-out points. `next(fitted)`: up to the budget left over
    the rounds left, the pool's points where the fits disagree (the training fit and the k-fold ones)
    or where the nearest measured neighbours are mispredicted out of fold (the curve bends there),
    per second of estimated time. Budgets are in estimated seconds (`Plan.point_seconds`).
    """

    def __init__(self, spec: SweepSpec, pool: Plan, coarse: Plan, budget_s: float, seed: int = SEED) -> None:
        self.spec, self.pool, self.budget_s = spec, pool, budget_s
        self.coarse = coarse
        self.rounds_left = spec.rounds
        self.plan = Plan(spec.name, [], [], [], dropped=pool.dropped, prep_s=pool.prep_s, capture_s=pool.capture_s)
        self.configs: dict[tuple, list[int]] = {}  # configuration -> pool indexes of its parts
        for i, p in enumerate(pool.points):
            self.configs.setdefault(p.config, []).append(i)
        self.rng = random.Random(seed)
        # Each group's values along each axis, in order: how far apart two candidates lie.
        values: dict[tuple[str, int], set] = {}
        for c in self.configs:
            for axis, v in enumerate(_coords(c)):
                values.setdefault((_group(c), axis), set()).add(v)
        self.ranks = {k: {v: r for r, v in enumerate(sorted(vs))} for k, vs in values.items()}

    @property
    def spent_s(self) -> float:
        return self.plan.seconds()

    def _taken(self) -> set[tuple]:
        return {p.config for p in self.plan.points}

    def _indexes(self, configs: Sequence[tuple], parts: Sequence[str]) -> list[int]:
        return [i for c in configs for i in self.configs[c] if self.pool.points[i].part in parts]

    def _cost(self, config: tuple, parts: Sequence[str]) -> float:
        return sum(self.pool.point_seconds(i) for i in self._indexes([config], parts))

    def _hand_out(self, plan: Plan) -> Plan:
        self.plan = self.plan + replace(plan, dropped=0)
        return plan

    def first(self) -> Plan:
        """The coarse pass, then random held-out points for `holdout_share` of the budget."""
        self._hand_out(self.coarse)
        held = self._holdout(max(self.spec.holdout_share * self.budget_s, HOLDOUT_MIN_S))
        return self.coarse + self._hand_out(held)

    def _holdout(self, budget_s: float) -> Plan:
        """Random whole steps of the pool, dealt to the groups in turn, each within the budget left."""
        taken = self._taken()
        free = {g: [c for c in self.configs if c not in taken and _group(c) == g] for g in GROUPS}
        for configs in free.values():
            self.rng.shuffle(configs)
        chosen: list[tuple] = []
        while any(free.values()):
            for group in HOLDOUT_DEAL:
                configs = free[group]
                while configs:
                    c = configs.pop()
                    if 0 < self._cost(c, ("all",)) <= budget_s:
                        budget_s -= self._cost(c, ("all",))
                        chosen.append(c)
                        break
        return self.pool.take(self._indexes(chosen, ("all",)), holdout=True)

    def next(self, fitted: Fitted, left_s: float | None = None) -> Plan:
        """The next round's points (none once the rounds or the budget are spent). `left_s`: the
        estimated seconds left (default: the budget less what was handed out)."""
        left = self.budget_s - self.spent_s if left_s is None else left_s
        if self.rounds_left < 1:
            return self.pool.take([])
        round_s = left / self.rounds_left
        self.rounds_left -= 1
        taken = self._taken()
        cost = {c: self._cost(c, self._parts(c)) for c in self.configs if c not in taken}
        value = self._values(fitted, {c: s for c, s in cost.items() if 0 < s <= round_s})
        chosen: list[int] = []
        room = ROUND_GROWTH * len(self.plan.points)
        while value and len(chosen) < room:
            best = max(value, key=value.__getitem__)
            chosen += self._indexes([best], self._parts(best))
            round_s -= cost[best]
            self._damp(value, best)
            value = {c: v for c, v in value.items() if cost[c] <= round_s and c != best}
        return self._hand_out(self.pool.take(chosen))

    def _parts(self, config: tuple) -> tuple[str, ...]:
        """What a refinement point times."""
        return PARTS if _group(config) in self.spec.refine_every_part else ("all",)

    def _values(self, fitted: Fitted, cost: dict[tuple, float]) -> dict[tuple, float]:
        """need x uncertainty / cost**COST_POWER of each candidate configuration."""
        models = [fitted.model, *fitted.cv.models]
        # Guided by training points only: the held-out ones must stay a random test.
        residual = {p.sample.point: abs(math.log1p(p.error_pct / 100)) for p in fitted.cv.points
                    if not p.sample.holdout}
        neighbours = _Neighbours(residual)
        need = _need(fitted.cv.groups())
        value = {}
        for c, seconds in cost.items():
            spread = float(np.std([math.log(m.sample_ms(_whole_step(c))) for m in models]))
            uncertainty = math.hypot(spread, neighbours.misfit(c))
            value[c] = need.get(_group(c), 1.0) * uncertainty / seconds ** COST_POWER
        return value

    def _damp(self, value: dict[tuple, float], picked: tuple) -> None:
        """Candidates one step from `picked` along one of its axes learn much of what it will tell."""
        for c in value:
            if self._steps_apart(c, picked) == 1:
                value[c] *= NEIGHBOUR_DAMPING

    def _steps_apart(self, a: tuple, b: tuple) -> int | None:
        """Steps between a and b on the pool's values of the one axis they differ along (None: not on a line)."""
        axes = [i for i, (x, y) in enumerate(zip(_coords(a), _coords(b))) if x != y]
        if _group(a) != _group(b) or len(axes) != 1:
            return None
        rank = self.ranks[(_group(a), axes[0])]
        return abs(rank[_coords(a)[axes[0]]] - rank[_coords(b)[axes[0]]])


def adaptive_sweep(sweep: AdaptiveSweep, measure: Callable[[Plan], list[Sample]],
                   fit: Callable[[list[Sample]], Fitted],
                   seconds_left: Callable[[], float] | None = None) -> tuple[list[Sample], Fitted]:
    """Measure the first pass, then fit and measure what the fit asks for until the sweep stops;
    the samples and the last fit, which saw them all. `seconds_left`: the estimated seconds still
    to spend (the profiler's wall clock over its pace); default: the sweep's own budget."""
    samples = measure(sweep.first())
    while True:
        fitted = fit(samples)
        batch = sweep.next(fitted, seconds_left() if seconds_left else None)
        if not batch.points:
            return samples, fitted
        samples += measure(batch)


def plan_sweep(spec: SweepSpec, split_sms: Sequence[int], total_sms: int, kv_capacity: int, cost: Cost,
               max_seq_len: int | None = None, prep_s: float = PREP_S, capture_s: float = CAPTURE_S,
               budget_s: float | None = None, seed: int = SEED) -> AdaptiveSweep:
    """An adaptive sweep over spec's pool for `budget_s` estimated seconds (default: spec.budget_s)."""
    budget_s = spec.budget_s if budget_s is None else budget_s
    pool = _thinned(spec.pool, split_sms, total_sms, kv_capacity, cost, max_seq_len, prep_s, capture_s, None)
    coarse = _thinned(spec.coarse, split_sms, total_sms, kv_capacity, cost, max_seq_len, prep_s, capture_s,
                      spec.coarse_share * budget_s)
    return AdaptiveSweep(spec, pool, coarse, budget_s, seed)


# -- the roofline estimate ---------------------------------------------------------------------
@dataclass(frozen=True)
class RooflineCost:
    """Rough step times from FLOPs and bytes, to plan the grid and show an ETA (never fitted on).

    Rates default to what docs/performance.md measured on an H100 for Llama-3.1-8B (prefill
    ~600 TFLOP/s, decode ~2.6 TB/s); `calibrated` rescales them from pilot steps on this GPU. The
    profiler replays both phases as CUDA graphs: no launch time.
    """

    dense_flops_per_token: float  # 2 x the weights every token multiplies through
    attn_flops_per_pair: float  # QK^T and PV: 4 x layers x q_size per (query, key) pair
    weight_bytes: float
    kv_bytes_per_token: float  # K and V of every layer
    lm_head_flops_per_row: float
    total_sms: int
    flops_per_ms: float = 6.0e11
    bytes_per_ms: float = 2.6e9

    @classmethod
    def of_config(cls, config: Any, total_sms: int, dtype_bytes: int = 2) -> RooflineCost:
        """From an engine ModelConfig (duck-typed: num_params, num_hidden_layers, q_size, kv_size, ...)."""
        layers = config.num_hidden_layers
        lm_head = 2 * config.hidden_size * config.vocab_size
        return cls(
            dense_flops_per_token=2 * config.num_params(include_embeddings=False),
            attn_flops_per_pair=4 * layers * config.q_size,
            weight_bytes=dtype_bytes * config.num_params(include_embeddings=True),
            kv_bytes_per_token=2 * layers * config.kv_size * dtype_bytes,
            lm_head_flops_per_row=lm_head,
            total_sms=total_sms,
        )

    def _work(self, phase: str, part: str, size: int, kv: int) -> tuple[float, float]:
        """(FLOPs, bytes) of one step's part."""
        if phase == "prefill":
            attn = (self.attn_flops_per_pair * size * (kv + size / 2), self.kv_bytes_per_token * (kv + size))
            dense = (self.dense_flops_per_token * size + self.lm_head_flops_per_row, self.weight_bytes)
        else:  # decode: every sequence reads its KV, the batch reads the weights once
            attn = (self.attn_flops_per_pair * kv, self.kv_bytes_per_token * kv)
            dense = (self.dense_flops_per_token * size + self.lm_head_flops_per_row * size, self.weight_bytes)
        chosen = {"attention": [attn], "dense": [dense], "all": [attn, dense]}[part]
        return sum(f for f, _ in chosen), sum(b for _, b in chosen)

    def __call__(self, phase: str, part: str, size: int, kv: int, sms: int) -> float:
        flops, nbytes = self._work(phase, part, size, kv)
        r = sms / self.total_sms
        # The shapes of docs/gpu-facts.md: compute scales almost linearly, bandwidth saturates near half the SMs,
        # and a partition runs ~15% slower than its share of the whole GPU.
        penalty = 1.0 if sms >= self.total_sms else PARTITION_PENALTY
        compute = flops / self.flops_per_ms * share(1.0, 0.25, 1.5) / share(r, 0.25, 1.5) * penalty
        memory = nbytes / self.bytes_per_ms * share(1.0, 0.15, 6.5) / share(r, 0.15, 6.5)
        return max(compute, memory)

    def calibrated(self, prefill_ms: float, decode_ms: float) -> RooflineCost:
        """Rescale the rates so the pilot steps (PILOT_PREFILL, PILOT_DECODE on the whole GPU) match."""
        p_flops, _ = self._work("prefill", "all", *PILOT_PREFILL)
        _, d_bytes = self._work("decode", "all", *PILOT_DECODE)
        return replace(self, flops_per_ms=p_flops / prefill_ms, bytes_per_ms=d_bytes / decode_ms)
