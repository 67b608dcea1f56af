"""Which points `nexus-tune profile` times, and a roofline estimate of each (pure Python).

A grid (full or quick) holds, per phase, the training SM counts and sizes, held-out points at SM
counts and sizes the fit never sees, and contention points (a decode step beside a prefill on the
other side of a split). A point whose single run is estimated above the grid's limit, or that
needs more KV than the cache holds, is left out; SM counts are thinned when the sweep would overrun
its budget. The estimate (`RooflineCost`, rescaled by pilot steps on the GPU) plans the grid and
drives the progress bar's ETA; nothing is fitted on it. commands/profiler.py times the points,
core/testing.py draws synthetic samples on them.

Grids (H100: prefill sides 8..120 SMs, decode sides 124..12):
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
import numpy as np
from nexus_tune.core.latency_model import PARTS, PHASES, Sample, share

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
LAUNCH_MS_PER_LAYER = 0.65

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
    contention_splits: tuple[float, ...]  # prefill share of the splits timed under contention
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


def repeats(est_ms: float) -> int:
    """Timed runs after warm-up: more for short steps, whose medians are noisier."""
    return 5 if est_ms < 50 else 3


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
    """The points to time, training and held-out (disjoint by construction), with estimated run times.

    Points that need more KV than the cache holds, or sequences longer than max_seq_len (the
    model's context), are left out (counted in `dropped`). With budget_s, the training SM counts
    are thinned (down to 3 and the whole GPU) until the estimated sweep fits in it.
    """
    spec = QUICK if quick else FULL
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


# -- the roofline estimate ---------------------------------------------------------------------
@dataclass(frozen=True)
class RooflineCost:
    """Rough step times from FLOPs and bytes, to plan the grid and show an ETA (never fitted on).

    Rates default to what docs/performance.md measured on an H100 for Llama-3.1-8B (prefill
    ~600 TFLOP/s, decode ~2.6 TB/s, an eager forward ~22 ms of Python launches: 0.65 ms per
    layer); `calibrated` rescales the rates from pilot steps on this GPU.
    """

    dense_flops_per_token: float  # 2 x the weights every token multiplies through
    attn_flops_per_pair: float  # QK^T and PV: 4 x layers x q_size per (query, key) pair
    weight_bytes: float
    kv_bytes_per_token: float  # K and V of every layer
    lm_head_flops_per_row: float
    total_sms: int
    launch_ms: float  # eager prefill: Python launches every kernel; overlaps the GPU work
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
            launch_ms=LAUNCH_MS_PER_LAYER * layers,
        )

    def _work(self, phase: str, part: str, size: int, kv: int) -> tuple[float, float, float]:
        """(FLOPs, bytes, launch ms) of one step's part."""
        if phase == "prefill":
            attn = (self.attn_flops_per_pair * size * (kv + size / 2), self.kv_bytes_per_token * (kv + size))
            dense = (self.dense_flops_per_token * size + self.lm_head_flops_per_row, self.weight_bytes)
            # store_kv + attention are ~30% of a layer's launches
            launch = self.launch_ms * {"attention": 0.3, "dense": 0.7, "all": 1.0}[part]
        else:  # decode: every sequence reads its KV, the batch reads the weights once
            attn = (self.attn_flops_per_pair * kv, self.kv_bytes_per_token * kv)
            dense = (self.dense_flops_per_token * size + self.lm_head_flops_per_row * size, self.weight_bytes)
            launch = 0.0  # a CUDA graph replay
        chosen = {"attention": [attn], "dense": [dense], "all": [attn, dense]}[part]
        return sum(f for f, _ in chosen), sum(b for _, b in chosen), launch

    def __call__(self, phase: str, part: str, size: int, kv: int, sms: int) -> float:
        flops, nbytes, launch = self._work(phase, part, size, kv)
        r = sms / self.total_sms
        # The shapes of docs/gpu-facts.md: compute scales almost linearly, bandwidth saturates near half the SMs,
        # and a partition runs ~15% slower than its share of the whole GPU.
        penalty = 1.0 if sms >= self.total_sms else PARTITION_PENALTY
        compute = flops / self.flops_per_ms * share(1.0, 0.25, 1.5) / share(r, 0.25, 1.5) * penalty
        memory = nbytes / self.bytes_per_ms * share(1.0, 0.15, 6.5) / share(r, 0.15, 6.5)
        return max(compute, memory, launch)

    def calibrated(self, prefill_ms: float, decode_ms: float) -> RooflineCost:
        """Rescale the rates so the pilot steps (PILOT_PREFILL, PILOT_DECODE on the whole GPU) match."""
        p_flops, _, _ = self._work("prefill", "all", *PILOT_PREFILL)
        _, d_bytes, _ = self._work("decode", "all", *PILOT_DECODE)
        return replace(self, flops_per_ms=p_flops / prefill_ms, bytes_per_ms=d_bytes / decode_ms)
