"""`LatencyModel`: step latency of prefill and decode as a function of work and SM share.

Each phase's GPU time is a sum over operator classes (attention, dense). A class costs the
larger of a compute time and a memory time (a smooth max, so the fit has gradients on both
sides of the roofline knee), plus a fixed GPU time that SMs do not shorten (t0: per-kernel
latency):

    compute = sum_i a_i * phi_i(size, kv) * waves / share(r; r_sat, decay) * stretch
    memory  = sum_j b_j * psi_j(size, kv) / share(r; mem_r_sat, mem_decay, mem_low) * stretch
    gpu     = t0 + smoothmax(compute (* whole), memory (* mem_whole))    (the factors on the whole GPU only)
    step    = smoothmax(launch, gpu)

`launch` is the CPU time of launching the step's kernels: an eager prefill step whose GPU work
is shorter than its Python launch loop takes the launch time (the GPU waits for kernels), so
the two overlap (a max), not add up. Decode runs as a CUDA graph: its launch is ~0.

`share` is the two-regime saturation-decay curve: below r_sat it is r itself (time ~ c/(r*C));
above, each extra SM is worth exp(-decay * (r - r_sat)) of one below it, so the curve
approaches r_sat + 1/decay. Decode's memory time may fall off faster than 1/r below its knee:
share = r_sat * (r / r_sat)^low there, low >= 1 (H200, qwen2.5-3b: the decode layers read their
weights at 44 GB/s per SM on 28 and 36 SMs but 35 on 20, where 1/r under-predicted them by 15%).

The whole GPU (sms == total_sms, no partition) gets its own factor `whole`: cuBLAS picks kernels for the whole chip and a partition loses more than its SM share,
more where the GEMMs are compute-bound than where they read weights: decode's memory time has its own
factor `mem_whole` (H200, qwen2.5-3b: 256 decode rows' layers take 3.3 ms on 132 SMs, 5.2 on 124; 64
rows 2.6 and 2.9).

`waves` (prefill attention, when the model's query heads are known; else 1): the kernel runs one
program per 64-row tile of (token, query head) rows of one KV head (GQA packed: 64 / G tokens of the
G query heads sharing it), as many programs per 64 tokens as query heads, g of them per SM's
resident slots, so a step takes ceil(x) waves where x = ceil(P_T / 64) * g / sms, and SMs short of another whole wave do
not help. Only the prefix's share of the work, KV_p / (KV_p + P_T/2), quantizes (the causal part
differs by tile and the heaviest-first order packs it):

    waves = 1 + (ceil(x) / x - 1) * KV_p / (KV_p + P_T / 2)

Contention: a prefill running on the other SMs stretches decode's compute and memory time by
1 + sum_k gamma_k * u_k over the bandwidth the prefill draws, as work per ms of prefill step:
its weights (1/T_p), its activations (P_T/T_p) and its attention KV streaming
(P_T*(KV_p + P_T/2)/T_p: each query tile reads the whole prefix), plus a base term for the
rest (L2, power). The compute time stretches too: a decode batch of 128 slows more beside a
prefill than one of 64 on the same SMs (H200, qwen2.5-3b on 36 SMs: 1.32x against 1.24x), though
more of its time is compute (a shared L2 and the clock under a power limit slow that as well);
stretching memory alone missed the 20-SM side by 18% (llama-3.1-8b), stretching both by 10% at most.
Memory-bound attention weighs in through its own gamma. The work features, not the fitted memory
coefficients, set u_k: a compute-bound prefill leaves its memory coefficients unidentified, and the
contention fit must not inherit that.

A decode running beside a prefill slows the prefill as well, more when it holds more SMs (H200, both
models: 1.18x on 104 SMs beside a 28-SM decode, 1.14x on 112 beside 20, 0.99-1.04x alone;
docs/performance.md). A prefill step beside a running decode is stretched by

    1 + prefill_contention * decode SMs / total SMs

`prefill_contention_` is fitted by `nexus-tune calibrate` from the engine's two-loop prefill steps
(core/overhead.py `fit_prefill_contention`): the profiler does not time prefill beside a decode. A
prefill on every SM (the time-sharing backend, where both phases share all SMs) is not stretched: no
such steps were measured.

Fitted parameters are plain attributes (`classes_`, `overhead_ms_`, `contention_`) that round-trip
through `to_dict`/`from_dict`; `update` keeps an online correction per phase (`corrections_`):

    corrected = scale * curve + fixed_ms + per_size_ms * size

shared by every SM count. It must be: the controller compares SM counts, and a correction that
differed by SM count would be learned only where the engine ran, so the SM counts it uses would
drift away from the ones it never tries (one factor per SM bucket did exactly that on the H200:
the used buckets absorbed host time, looked slower than the unvisited reference, and decode
took the SMs). The terms follow step kind and size, where an engine's excess lives (host work
per sequence, skewed batches, a slower build). They are an exponentially weighted least-squares
fit, damped toward no correction (scale 1, no offsets): an excess that steps of one size on one
SM count cannot attribute goes mostly to the scale instead of extrapolating wildly.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares, nnls

PHASES = ("prefill", "decode")
CLASSES = ("attention", "dense")
PARTS = ("all", *CLASSES)
# Sharpness of the smooth max(compute, memory): 2**(1/6) = 1.12x at the knee, where neither
# resource is fully overlapped with the other.
SOFTMAX_P = 6.0
# Several starting curves: the fit is non-convex in (r_sat, decay).
_STARTS = ((0.5, 1.0, 0.3, 5.0), (0.2, 2.0, 0.15, 8.0), (0.9, 0.1, 0.5, 2.0))
_SCOUT_NFEV, _POLISH_NFEV = 150, 600
_R_BOUNDS = (0.02, 1.0)
_DECAY_BOUNDS = (1e-3, 60.0)
_MEM_LOW_BOUNDS = (1.0, 3.0)
# Phases whose memory time gets its own whole-GPU factor: decode's few rows are memory-bound and its many
# compute-bound, and a partition costs the two differently; prefill's memory time shows only in a few
# small whole-GPU steps, too few to fit a factor of its own (one held out, the fit missed it by 33%).
MEM_WHOLE_PHASES = ("decode",)
# Phases whose memory share below its knee is fitted as r^mem_low (elsewhere mem_low = 1): decode's
# weight reads on few SMs. Prefill's memory time shows only in small steps, and a free exponent there
# bent the curve to fit a few of them on 8 SMs and missed the rest when they were held out (H200,
# qwen2.5-3b: a 128-token chunk over 8192 KV on 8 SMs 41% off; fixed at 1, 10% at worst).
MEM_LOW_PHASES = ("decode",)
_LOG_COEF_BOUNDS = (-25.0, 12.0)
_LOG_WHOLE_BOUNDS = (math.log(0.5), math.log(2.0))
_CONTENTION_TERMS = ("base", "weights", "activations", "attention")
# Prefill attention's waves (module docstring; H200, llama-3.1-8b: a 512-token chunk over 8192 KV takes
# 12.4-13.0 ms of attention on 72 to 112 SMs, two waves, and 7.4 on 132, one). WAVE_TILE is the engine
# kernel's query tile (nexus_tune/engine/kernels/prefill_attention.py). With the model's query heads known, the fit
# tries each count of programs resident per SM and keeps the best if it beats no waves; without them it
# fits none: searched freely, a wave size 3% off fitted as well on the H200 grid and put held-out points
# at the steps' edges a wave off (28% wrong). Decode attention sizes its grid by the SM count and the
# GEMMs are sized by cuBLAS for their side: no waves there.
WAVE_TILE = 64
WAVE_CLASSES = {("prefill", "attention")}
RESIDENT_PROGRAMS = (1, 2, 3, 4)
# Online correction. Each observation's weight decays by 1 - 1/CORRECTION_MEMORY per later one of its
# phase (decode: about a second of steps; prefill: several seconds). Damping pulls each term
# (scale, fixed, per size) toward no correction by this share of its own evidence: a term the
# data pins down moves all but ~0.1% of the way, and an excess the data cannot attribute (one
# SM count, one batch size) goes to the terms 100:1:1, mostly to the scale, the prior that carries
# to other SM counts best (tests/test_latency_model.py: within 4% on every SM count after seeing one).
CORRECTION_MEMORY = 50
CORRECTION_DAMPING = (1e-5, 1e-3, 1e-3)
# An observation this far off the curve, either way, is a hiccup (a GC pause, a first-call compile)
# and is clipped before it is fitted; a corrected prediction stays within it too.
CORRECTION_RANGE = 4.0
_NO_CORRECTION = (1.0, 0.0, 0.0)  # (scale, fixed_ms, per_size_ms)


@dataclass
class Sample:
    """One measured step: median latency of `part` of `phase` at (size, kv) on `sms` SMs.

    size is P_T (prefill chunk tokens) or B_d (decode batch); kv is KV_p or KV_d. A decode sample
    with prefill_tokens > 0 was timed while that prefill ran on the complementary SMs.
    """

    phase: str
    part: str
    size: int
    kv: int
    sms: int
    ms: float
    prefill_tokens: int = 0
    prefill_kv: int = 0
    holdout: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES or self.part not in PARTS:
            raise ValueError(f"sample has phase {self.phase!r} part {self.part!r}; expected {PHASES} x {PARTS}")
        if self.size < 1 or self.kv < 0 or self.sms < 1 or not self.ms > 0:
            raise ValueError(f"sample out of range: {self}")

    @property
    def key(self) -> tuple:
        """What was measured (not the result): held-out and training keys must not meet."""
        return (self.phase, self.part, self.size, self.kv, self.sms, self.prefill_tokens, self.prefill_kv)

    @property
    def point(self) -> tuple:
        """The configuration measured, whatever the part: a point's parts are held out together."""
        return (self.phase, self.size, self.kv, self.sms, self.prefill_tokens, self.prefill_kv)

    @property
    def group(self) -> str:
        """Where a whole-step error is reported: the phase, or contention for decode beside a prefill."""
        return "contention" if self.prefill_tokens else self.phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# Work features per (phase, class), in thousands of tokens (millions of token pairs for
# attention FLOPs) so coefficients are O(ms). They take numbers or numpy arrays alike.
def _prefill_attention(n: Any, kv: Any) -> tuple[list, list]:
    # FLOPs ~ P_T * (KV_p + P_T/2) (causal); per-token work (rope, softmax rows); KV read.
    return [n * (kv + n / 2) / 1e6, n / 1e3], [(kv + n) / 1e3]


def chunk_prefix(tokens: int, pairs: int) -> int:
    """The prefix at which one chunk of `tokens` new tokens attends `pairs` causal (query, key) pairs.

    The prefill features price one chunk over one prefix; several chunks packed into a step each
    attend their own prefix only, so pricing them at the summed prefix charges every token for every
    prefix. Priced here at the prefix that gives the same pairs, they cost what they attend (a
    single chunk keeps its own prefix; fresh prompts packed together get 0)."""
    if tokens <= 0:
        return 0
    return max(round((pairs - tokens * (tokens + 1) / 2) / tokens), 0)


def _prefill_dense(n: Any, kv: Any) -> tuple[list, list]:
    # FLOPs linear in tokens; weights read once plus activations per token.
    return [n / 1e3], [1.0, n / 1e3]


def _decode_attention(b: Any, kv: Any) -> tuple[list, list]:
    # KV_d read dominates; per-sequence work; the longest serial walk per CTA ~ KV_d / B_d.
    return [kv / 1e3, b / 1e3, kv / b / 1e3], [kv / 1e3, b / 1e3]


def _decode_dense(b: Any, kv: Any) -> tuple[list, list]:
    # Weights (constant) plus a small per-sequence term; FLOPs linear in the batch.
    return [b / 1e3], [1.0, b / 1e3]


FEATURES: dict[tuple[str, str], Callable[[Any, Any], tuple[list, list]]] = {
    ("prefill", "attention"): _prefill_attention,
    ("prefill", "dense"): _prefill_dense,
    ("decode", "attention"): _decode_attention,
    ("decode", "dense"): _decode_dense,
}


class _Scalar:
    """The numpy functions the formulas use, for plain floats (numpy scalars are 10x slower)."""

    exp = staticmethod(math.exp)
    ceil = staticmethod(math.ceil)
    minimum = staticmethod(min)
    maximum = staticmethod(max)


def share(r: Any, r_sat: float, decay: float, xp: Any = _Scalar, low: float = 1.0) -> Any:
    """Effective SM share: r_sat * (r / r_sat)^low below r_sat (r itself at low = 1), diminishing
    returns with rate `decay` above."""
    over = xp.maximum(r - r_sat, 0.0)
    below = xp.minimum(r, r_sat)
    if low != 1.0:
        below = r_sat * (below / r_sat) ** low
    return below + (1.0 - xp.exp(-decay * over)) / decay


def _smooth_max(a: Any, b: Any) -> Any:
    return (a**SOFTMAX_P + b**SOFTMAX_P) ** (1.0 / SOFTMAX_P)


def _step(launch_ms: Any, gpu_ms: Any) -> Any:
    """A step launched from an idle stream ends when both the CPU launch loop and the GPU work do."""
    return _smooth_max(launch_ms, gpu_ms)


def _phase_step(classes: dict[str, OpClass], overhead_ms: float, gpu_ms: dict[str, Any]) -> Any:
    """The whole step: every class's launches in one loop, every class's GPU work plus `overhead_ms`."""
    return _step(sum(classes[c].launch_ms for c in CLASSES), sum(gpu_ms[c] for c in CLASSES) + overhead_ms)


@dataclass
class OpClass:
    """Fitted parameters of one operator class of one phase (times in ms)."""

    compute: list[float]  # a_i: ms per work unit at SM share 1 of the linear regime
    r_sat: float
    decay: float
    memory: list[float]  # b_j: ms per byte unit at bandwidth share 1 of the linear regime
    mem_r_sat: float
    mem_decay: float
    t0_ms: float  # fixed GPU time, independent of the SM count
    launch_ms: float  # CPU time to launch the class's kernels (overlaps the GPU time)
    whole: float  # factor on the whole GPU stream against the partition curve
    wave_programs: float = 0.0  # programs per WAVE_TILE tokens per SM's slots (WAVE_CLASSES); 0: no waves
    mem_low: float = 1.0  # memory share's exponent below mem_r_sat (1: time ~ 1/r there)
    mem_whole: float | None = None  # `whole` for the memory time alone (None: `whole`, as fitted before)

    def __post_init__(self) -> None:
        if self.mem_whole is None:
            self.mem_whole = self.whole

    def waves(self, size: Any, kv: Any, sms: Any, xp: Any = _Scalar) -> Any:
        """Compute time in whole waves of programs over the time of the same work spread evenly.
        Only the prefix's share of the work quantizes: the causal part differs from tile to tile and
        the heaviest-first tile order packs it."""
        if not self.wave_programs:
            return 1.0
        waves = xp.ceil(size / WAVE_TILE) * self.wave_programs / sms
        return 1.0 + (xp.ceil(waves - 1e-9) / waves - 1.0) * kv / (kv + size / 2)

    def gpu_ms(self, feats: tuple[list, list], r: Any, whole: Any, stretch: Any = 1.0, xp: Any = _Scalar,
               waves: Any = 1.0) -> Any:
        phi, psi = feats  # map(mul): the controller calls this on every step, a generator costs 2x
        comp = sum(map(operator.mul, self.compute, phi)) * waves / share(r, self.r_sat, self.decay, xp)
        mem = sum(map(operator.mul, self.memory, psi)) / share(r, self.mem_r_sat, self.mem_decay, xp, self.mem_low)
        return self.t0_ms + stretch * _smooth_max(comp * (1.0 + (self.whole - 1.0) * whole),
                                                  mem * (1.0 + (self.mem_whole - 1.0) * whole))


@dataclass
class _Layout:
    """Where each OpClass parameter sits in the least-squares vector of one phase."""

    phase: str
    wave_programs: dict[str, float] = field(default_factory=dict)  # fixed during a fit (a discrete choice)
    n_comp: dict[str, int] = field(default_factory=dict)
    n_mem: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cls in CLASSES:
            phi, psi = FEATURES[(self.phase, cls)](1.0, 1.0)
            self.n_comp[cls], self.n_mem[cls] = len(phi), len(psi)

    @property
    def own_mem_whole(self) -> bool:
        """The phase's memory time has a whole-GPU factor of its own in the vector (MEM_WHOLE_PHASES)."""
        return self.phase in MEM_WHOLE_PHASES

    @property
    def fits_mem_low(self) -> bool:
        """The phase's memory exponent below the knee is in the vector (MEM_LOW_PHASES); else it is 1."""
        return self.phase in MEM_LOW_PHASES

    def pack(self, classes: dict[str, OpClass], overhead: float) -> np.ndarray:
        x: list[float] = []
        for c in CLASSES:
            p = classes[c]
            x += [math.log(v) for v in p.compute] + [p.r_sat, p.decay]
            x += [math.log(v) for v in p.memory] + [p.mem_r_sat, p.mem_decay, p.t0_ms, p.launch_ms,
                                                    math.log(p.whole)]
            if self.fits_mem_low:
                x.append(p.mem_low)
            if self.own_mem_whole:
                x.append(math.log(p.mem_whole))
        return np.array(x + [overhead])

    def unpack(self, x: Sequence[float]) -> tuple[dict[str, OpClass], float]:
        classes, i = {}, 0
        for c in CLASSES:
            nc, nm = self.n_comp[c], self.n_mem[c]
            comp = [math.exp(v) for v in x[i : i + nc]]
            i += nc
            r_sat, decay = x[i], x[i + 1]
            mem = [math.exp(v) for v in x[i + 2 : i + 2 + nm]]
            i += 2 + nm
            classes[c] = OpClass(comp, float(r_sat), float(decay), mem, float(x[i]), float(x[i + 1]),
                                 float(x[i + 2]), float(x[i + 3]), math.exp(x[i + 4]), self.wave_programs.get(c, 0.0))
            i += 5
            if self.fits_mem_low:
                classes[c].mem_low = float(x[i])
                i += 1
            if self.own_mem_whole:
                classes[c].mem_whole = math.exp(x[i])
                i += 1
        return classes, float(x[i])

    def bounds(self) -> tuple[list[float], list[float]]:
        lo: list[float] = []
        hi: list[float] = []
        for c in CLASSES:
            for n in (self.n_comp[c], self.n_mem[c]):
                lo += [_LOG_COEF_BOUNDS[0]] * n + [_R_BOUNDS[0], _DECAY_BOUNDS[0]]
                hi += [_LOG_COEF_BOUNDS[1]] * n + [_R_BOUNDS[1], _DECAY_BOUNDS[1]]
            lo += [0.0, 0.0, _LOG_WHOLE_BOUNDS[0]]
            hi += [np.inf, np.inf, _LOG_WHOLE_BOUNDS[1]]
            if self.fits_mem_low:
                lo.append(_MEM_LOW_BOUNDS[0])
                hi.append(_MEM_LOW_BOUNDS[1])
            if self.own_mem_whole:
                lo.append(_LOG_WHOLE_BOUNDS[0])
                hi.append(_LOG_WHOLE_BOUNDS[1])
        return lo + [0.0], hi + [np.inf]


@dataclass
class _Batch:
    """The samples of one phase as arrays, for vectorized evaluation during the fit."""

    feats: dict[str, tuple[list, list]]
    size: np.ndarray
    kv: np.ndarray
    sms: np.ndarray
    r: np.ndarray
    whole: np.ndarray
    part: np.ndarray
    ms: np.ndarray

    @classmethod
    def of(cls, phase: str, samples: Sequence[Sample], total_sms: int) -> _Batch:
        size = np.array([s.size for s in samples], dtype=float)
        kv = np.array([s.kv for s in samples], dtype=float)
        sms = np.array([s.sms for s in samples], dtype=float)
        return cls(
            feats={c: FEATURES[(phase, c)](size, kv) for c in CLASSES},
            size=size, kv=kv, sms=sms,
            r=sms / total_sms,
            whole=(sms >= total_sms).astype(float),
            part=np.array([s.part for s in samples]),
            ms=np.array([s.ms for s in samples], dtype=float),
        )

    def predict(self, classes: dict[str, OpClass], overhead: float) -> np.ndarray:
        gpu = {c: classes[c].gpu_ms(self.feats[c], self.r, self.whole, xp=np,
                                    waves=classes[c].waves(self.size, self.kv, self.sms, np)) for c in CLASSES}
        t = {c: _step(classes[c].launch_ms, gpu[c]) for c in CLASSES}
        everything = _phase_step(classes, overhead, gpu)
        dense_or_all = np.where(self.part == "dense", t["dense"], everything)
        return np.where(self.part == "attention", t["attention"], dense_or_all)


def _initial_classes(batch: _Batch, start: tuple[float, ...]) -> tuple[dict[str, OpClass], float]:
    """Coefficients from a non-negative linear fit (sum instead of max) under a fixed starting curve."""
    r_sat, decay, mem_r_sat, mem_decay = start
    cols: list[np.ndarray] = []
    owners: list[tuple[str, str]] = []  # (class, "compute" | "memory" | "t0") per column
    for c in CLASSES:
        in_class = (batch.part == c) | (batch.part == "all")
        phi, psi = batch.feats[c]
        for f in phi:
            cols.append(np.where(in_class, f / share(batch.r, r_sat, decay, np), 0.0))
            owners.append((c, "compute"))
        for f in psi:
            cols.append(np.where(in_class, f / share(batch.r, mem_r_sat, mem_decay, np), 0.0))
            owners.append((c, "memory"))
        cols.append(in_class.astype(float))
        owners.append((c, "t0"))
    cols.append((batch.part == "all").astype(float))
    # Relative error: scale rows by 1/ms.
    design = np.stack([np.broadcast_to(col, batch.ms.shape) for col in cols], axis=1) / batch.ms[:, None]
    coef, _ = nnls(design, np.ones_like(batch.ms))
    floor = 1e-6 * float(np.median(batch.ms))
    classes = {}
    for c in CLASSES:
        mine = [(kind, v) for (owner, kind), v in zip(owners, coef) if owner == c]
        # launch starts positive: the smooth max has no gradient in it at 0.
        own = batch.ms[batch.part == c]
        classes[c] = OpClass(
            compute=[max(v, floor) for k, v in mine if k == "compute"], r_sat=r_sat, decay=decay,
            memory=[max(v, floor) for k, v in mine if k == "memory"], mem_r_sat=mem_r_sat, mem_decay=mem_decay,
            t0_ms=next(v for k, v in mine if k == "t0"), launch_ms=0.5 * float(own.min() if own.size else floor),
            whole=1.0,
        )
    return classes, float(coef[-1])


def _fit_phase(phase: str, samples: Sequence[Sample], total_sms: int,
               attention_heads: int | None = None) -> tuple[dict[str, OpClass], float]:
    batch = _Batch.of(phase, samples, total_sms)
    layout = _Layout(phase)
    lo, hi = layout.bounds()
    log_ms = np.log(batch.ms)

    def solve(layout: _Layout, x0: np.ndarray, max_nfev: int) -> Any:
        def residuals(x: np.ndarray) -> np.ndarray:
            return np.log(batch.predict(*layout.unpack(x))) - log_ms

        # soft_l1 at 5%: one disturbed measurement must not bend the whole curve.
        return least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, x_scale="jac",
                             max_nfev=max_nfev)

    # A short run from every start, then the best one run to convergence: some starts crawl.
    tries = [solve(layout, np.clip(layout.pack(*_initial_classes(batch, s)), lo, hi), _SCOUT_NFEV) for s in _STARTS]
    best = solve(layout, min(tries, key=lambda r: r.cost).x, _POLISH_NFEV)
    # Waves are a discrete choice: a short refit from the smooth fit per candidate, the best one run to
    # convergence and kept if it fits better than no waves.
    for cls in (c for c in CLASSES if (phase, c) in WAVE_CLASSES and attention_heads):
        waved = [replace(layout, wave_programs={cls: attention_heads / n}) for n in RESIDENT_PROGRAMS]
        tries = [(solve(w, best.x, _SCOUT_NFEV), w) for w in waved]
        scout, chosen = min(tries, key=lambda t: t[0].cost)
        again = solve(chosen, scout.x, _POLISH_NFEV)
        if again.cost < best.cost:
            best, layout = again, chosen
    return layout.unpack(best.x)


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float]:
    """x with a x = b for a 3x3 system (Cramer's rule: no array overhead on the engine's step path)."""
    def det(m: list[list[float]]) -> float:
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))

    d = det(a)
    cols = [[[b[i] if j == k else a[i][j] for j in range(3)] for i in range(3)] for k in range(3)]
    return det(cols[0]) / d, det(cols[1]) / d, det(cols[2]) / d


@dataclass
class Correction:
    """One phase's online correction, `coef_` = (scale, fixed_ms, per_size_ms), and the decayed
    normal equations it solves: `gram_` = sum w x x^T and `moment_` = sum w x y over observations
    y of steps whose curve predicted x = (curve_ms, 1, size)."""

    coef_: tuple[float, float, float] = _NO_CORRECTION
    gram_: list[list[float]] = field(default_factory=list)
    moment_: list[float] = field(default_factory=list)

    def apply(self, curve_ms: float, size: float) -> float:
        scale, fixed, per_size = self.coef_
        ms = scale * curve_ms + fixed + per_size * size
        return min(max(ms, curve_ms / CORRECTION_RANGE), curve_ms * CORRECTION_RANGE)

    def add(self, curve_ms: float, size: float, observed_ms: float) -> None:
        x = (curve_ms, 1.0, float(size))
        y = min(max(observed_ms, curve_ms / CORRECTION_RANGE), curve_ms * CORRECTION_RANGE)
        if not self.gram_:  # the prior as one observation per term at this scale: solvable from the start
            self.gram_ = [[x[i] ** 2 if i == j else 0.0 for j in range(3)] for i in range(3)]
            self.moment_ = [x[i] ** 2 * _NO_CORRECTION[i] for i in range(3)]
        keep = 1.0 - 1.0 / CORRECTION_MEMORY
        g, m = self.gram_, self.moment_
        for i in range(3):
            m[i] = keep * m[i] + x[i] * y
            for j in range(3):
                g[i][j] = keep * g[i][j] + x[i] * x[j]
        # (G + k diag G) coef = m + k diag(G) coef_0: damped toward no correction, in each term's own units.
        damped = [[g[i][j] * (1.0 + CORRECTION_DAMPING[i] * (i == j)) for j in range(3)] for i in range(3)]
        self.coef_ = _solve3(damped, [m[i] + CORRECTION_DAMPING[i] * g[i][i] * _NO_CORRECTION[i] for i in range(3)])

    def to_dict(self) -> dict[str, Any]:
        return {"coef": list(self.coef_), "gram": self.gram_, "moment": self.moment_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Correction:
        """Also reads the per-SM-bucket factors of older profiles (a dict of numbers) as no correction:
        they were biased by the SM counts the engine happened to use."""
        if "coef" not in d:
            return cls()
        scale, fixed, per_size = (float(v) for v in d["coef"])
        return cls((scale, fixed, per_size), [[float(v) for v in row] for row in d["gram"]],
                   [float(v) for v in d["moment"]])


def error_stats(relative: Sequence[float]) -> dict[str, float]:
    """MAPE, largest error (both %) and count of relative errors |predicted - measured| / measured."""
    return {"mape_pct": 100 * float(np.mean(relative)), "max_pct": 100 * float(np.max(relative)), "n": len(relative)}


class LatencyModel:
    """Predicts prefill and decode step latency (ms) from work and SM count; sklearn-style `fit`."""

    def __init__(self, total_sms: int, split_sms: Sequence[int] | None = None, attention_heads: int | None = None):
        """split_sms: prefill SM counts of the splits the device allows (decode gets the rest);
        saturation_sms searches those. None: every SM count. attention_heads: the model's query
        heads, which place prefill attention's waves (WAVE_CLASSES); None: a fit without waves."""
        if total_sms < 1:
            raise ValueError("total_sms must be >= 1")
        if attention_heads is not None and attention_heads < 1:
            raise ValueError(f"attention_heads must be >= 1 or None, not {attention_heads}")
        self.total_sms = int(total_sms)
        self.split_sms = sorted(int(p) for p in split_sms) if split_sms is not None else None
        self.attention_heads = int(attention_heads) if attention_heads else None
        if self.split_sms and not 0 < self.split_sms[0] <= self.split_sms[-1] < self.total_sms:
            raise ValueError(f"split_sms must lie strictly between 0 and {total_sms}: {self.split_sms}")
        self.classes_: dict[str, dict[str, OpClass]] = {}
        self.overhead_ms_: dict[str, float] = {}
        self.contention_: dict[str, float] = dict.fromkeys(_CONTENTION_TERMS, 0.0)
        self.prefill_contention_ = 0.0  # calibrated from engine steps, not fitted from samples (docstring)
        self.corrections_: dict[str, Correction] = {p: Correction() for p in PHASES}

    def fresh(self) -> LatencyModel:
        """An unfitted model set up as this one (GPU, splits, heads): what a refit or a fold fits."""
        return LatencyModel(self.total_sms, self.split_sms, self.attention_heads)

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, samples: Iterable[Sample]) -> LatencyModel:
        """Fit every phase on its solo samples, then the contention terms on the contended ones."""
        samples = list(samples)
        for phase in PHASES:
            solo = [s for s in samples if s.phase == phase and not s.prefill_tokens]
            if not solo:
                raise ValueError(f"no {phase} samples to fit")
            self.classes_[phase], self.overhead_ms_[phase] = _fit_phase(phase, solo, self.total_sms,
                                                                        self.attention_heads)
        contended = [s for s in samples if s.prefill_tokens]
        self.contention_ = self._fit_contention(contended) if contended else dict.fromkeys(_CONTENTION_TERMS, 0.0)
        self.corrections_ = {p: Correction() for p in PHASES}
        return self

    def _fit_contention(self, samples: Sequence[Sample]) -> dict[str, float]:
        pressure = np.array([self._pressure_terms(s.sms, s.prefill_tokens, s.prefill_kv) for s in samples])
        log_ms = np.log([s.ms for s in samples])

        def residuals(g: np.ndarray) -> np.ndarray:
            stretch = 1.0 + pressure @ g
            pred = [self._base_ms("decode", s.size, s.kv, s.sms, st) for s, st in zip(samples, stretch)]
            return np.log(pred) - log_ms

        # Terms are work per ms of prefill (~0.001-0.2), so their weights reach the hundreds.
        res = least_squares(residuals, np.full(len(_CONTENTION_TERMS), 0.1), bounds=(0.0, 1e3), loss="soft_l1",
                            f_scale=0.05)
        return dict(zip(_CONTENTION_TERMS, map(float, res.x)))

    # -- prediction ----------------------------------------------------------------------------
    def _check(self, phase: str, sms: int, size: float = 1, kv: float = 0) -> None:
        if not self.classes_:
            raise RuntimeError("LatencyModel is not fitted: call fit(samples) or load a profile")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
        if not 1 <= sms <= self.total_sms:
            raise ValueError(f"sms must be in 1..{self.total_sms}, not {sms}")
        if not (size >= 1 and kv >= 0):
            raise ValueError(f"a {phase} step needs size >= 1 and kv >= 0, not size {size!r} kv {kv!r}")

    def _gpu_ms(self, phase: str, cls: str, size: float, kv: float, sms: int, stretch: float = 1.0) -> float:
        op = self.classes_[phase][cls]
        return op.gpu_ms(FEATURES[(phase, cls)](size, kv), sms / self.total_sms, float(sms >= self.total_sms),
                         stretch, waves=op.waves(size, kv, sms))

    def _base_ms(self, phase: str, size: float, kv: float, sms: int, stretch: float = 1.0) -> float:
        """The fitted curve alone, without online correction."""
        gpu = {c: self._gpu_ms(phase, c, size, kv, sms, stretch) for c in CLASSES}
        return _phase_step(self.classes_[phase], self.overhead_ms_[phase], gpu)

    def _pressure_terms(self, decode_sms: int, prefill_tokens: float, prefill_kv: float) -> list[float]:
        """u_k of the contention terms: what a prefill on the other SMs streams per ms of its step.

        With decode on every SM the two phases time-share the chip (the time-sharing backend, or
        a controller's whole-GPU reference under the same load): the prefill is taken on every SM.
        """
        prefill_sms = self.total_sms - decode_sms if decode_sms < self.total_sms else self.total_sms
        step = self._base_ms("prefill", prefill_tokens, prefill_kv, prefill_sms)
        pairs = FEATURES[("prefill", "attention")](prefill_tokens, prefill_kv)[0][0]
        return [1.0, 1.0 / step, prefill_tokens / 1e3 / step, pairs / step]

    def _stretch(self, sms: int, prefill_tokens: float, prefill_kv: float) -> float:
        if prefill_tokens <= 0:
            return 1.0
        terms = self._pressure_terms(sms, prefill_tokens, prefill_kv)
        return 1.0 + sum(self.contention_[k] * t for k, t in zip(_CONTENTION_TERMS, terms))

    def prefill_stretch(self, sms: int) -> float:
        """A prefill step on `sms` SMs beside a decode running on the rest, over the same step alone."""
        return 1.0 + self.prefill_contention_ * (self.total_sms - sms) / self.total_sms

    def curve_ms(self, phase: str, size: float, kv: float, sms: int, prefill_tokens: float = 0,
                 prefill_kv: float = 0, beside_decode: bool = False) -> float:
        """The fitted curve without the online correction (decode: slowed by a prefill of
        `prefill_tokens` on the other SMs; prefill: by a decode beside it). It changes only with a
        refit: cache it, then `correct`."""
        self._check(phase, sms, size, kv)
        if phase == "decode":
            stretch = self._stretch(sms, prefill_tokens, prefill_kv)
        else:
            stretch = self.prefill_stretch(sms) if beside_decode else 1.0
        return self._base_ms(phase, size, kv, sms, stretch)

    def correct(self, phase: str, curve_ms: float, size: float) -> float:
        """A curve prediction of a step of `size` (tokens or sequences) under the online correction."""
        return self.corrections_[phase].apply(curve_ms, size)

    def predict_prefill(self, tokens: float, kv_prefix: float, sms: int, beside_decode: bool = False) -> float:
        """Prefill step on `sms` SMs; with beside_decode, while a decode runs on the rest."""
        return self.correct("prefill", self.curve_ms("prefill", tokens, kv_prefix, sms, beside_decode=beside_decode),
                            tokens)

    def predict_decode(self, batch: float, kv_tokens: float, sms: int,
                       prefill_tokens: float = 0, prefill_kv: float = 0) -> float:
        """Decode step on `sms` SMs; with prefill_tokens > 0, while that prefill runs on the rest."""
        return self.correct("decode", self.curve_ms("decode", batch, kv_tokens, sms, prefill_tokens, prefill_kv),
                            batch)

    def predict_mixed(self, prefill_tokens: float, prefill_kv: float, decode_seqs: float, decode_kv: float,
                      sms: int) -> float:
        """A chunked-prefill step (vLLM v1): prompt chunks and decode rows in one forward on `sms` SMs.

        Every row costs what a prefill token costs in the dense layers; the decode rows' attention
        over their KV is added from the decode model (its step at the same batch minus the batch
        with no KV)."""
        if not decode_seqs:
            return self.predict_prefill(prefill_tokens, prefill_kv, sms)
        if not prefill_tokens:
            return self.predict_decode(decode_seqs, decode_kv, sms)
        attention = max(self.predict_decode(decode_seqs, decode_kv, sms) - self.predict_decode(decode_seqs, 0, sms), 0.0)
        return self.predict_prefill(prefill_tokens + decode_seqs, prefill_kv, sms) + attention

    def predict(self, phase: str, size: float, kv: float, sms: int, **contention: float) -> float:
        if phase == "prefill":
            return self.predict_prefill(size, kv, sms)
        return self.predict_decode(size, kv, sms, **contention)

    def predict_part(self, phase: str, part: str, size: float, kv: float, sms: int) -> float:
        """One operator class alone (or "all"), as the profiler times it; no online correction."""
        self._check(phase, sms, size, kv)
        if part == "all":
            return self._base_ms(phase, size, kv, sms)
        if part not in CLASSES:
            raise ValueError(f"part must be one of {PARTS}, not {part!r}")
        return _step(self.classes_[phase][part].launch_ms, self._gpu_ms(phase, part, size, kv, sms))

    def sm_choices(self, phase: str) -> list[int]:
        """The SM counts `phase` can run on, ascending: its side of every split, then the whole GPU."""
        if self.split_sms is None:
            return list(range(1, self.total_sms + 1))
        side = self.split_sms if phase == "prefill" else [self.total_sms - p for p in self.split_sms]
        return sorted(side) + [self.total_sms]

    def saturation_sms(self, phase: str, size: float, kv: float, within: float = 0.05,
                       reference_sms: int | None = None) -> int:
        """Fewest SMs whose predicted step is within `within` (0.05 = 5%) of the step on
        `reference_sms` (default: the whole GPU; a partition's largest side says where SMs stop
        paying inside a split, since a partition can run slower than the whole-GPU stream)."""
        reference_sms = reference_sms or self.total_sms
        self._check(phase, reference_sms)
        limit = self.predict(phase, size, kv, reference_sms) * (1.0 + within)
        return next(s for s in self.sm_choices(phase) if self.predict(phase, size, kv, s) <= limit)

    # -- online correction ---------------------------------------------------------------------
    def update(self, phase: str, size: float, kv: float, sms: int, observed_ms: float,
               prefill_tokens: float = 0, prefill_kv: float = 0, beside_decode: bool = False) -> float:
        """Fit one measured step into the phase's correction (module docstring); returns what the
        model predicted for it before (the step log's "predicted" beside the observed).

        `observed_ms`: the step's GPU time, from events around its launch (host work is the
        profile's StepOverhead, not this). Decode: `prefill_tokens`/`prefill_kv` of the prefill
        running on the other SMs when it launched; prefill: whether a decode ran beside it.
        """
        if not (observed_ms > 0 and math.isfinite(observed_ms)):
            raise ValueError(f"observed_ms must be a positive finite number, not {observed_ms!r}")
        curve = self.curve_ms(phase, size, kv, sms, prefill_tokens, prefill_kv, beside_decode)
        predicted = self.correct(phase, curve, size)
        self.corrections_[phase].add(curve, size, observed_ms)
        return predicted

    # -- evaluation ----------------------------------------------------------------------------
    def sample_ms(self, s: Sample) -> float:
        """What the fitted curve (no online correction) predicts sample `s` measured: its part, beside its prefill."""
        if s.part != "all":
            return self.predict_part(s.phase, s.part, s.size, s.kv, s.sms)
        return self.curve_ms(s.phase, s.size, s.kv, s.sms, s.prefill_tokens, s.prefill_kv)

    def errors(self, samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
        """Relative error of whole-step predictions (part "all"): per phase, and decode under contention."""
        groups: dict[str, list[float]] = {}
        for s in samples:
            if s.part == "all":
                groups.setdefault(s.group, []).append(abs(self.sample_ms(s) - s.ms) / s.ms)
        return {k: error_stats(v) for k, v in groups.items()}

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "total_sms": self.total_sms,
            "split_sms": self.split_sms,
            "attention_heads": self.attention_heads,
            "classes": {p: {c: asdict(op) for c, op in cl.items()} for p, cl in self.classes_.items()},
            "overhead_ms": dict(self.overhead_ms_),
            "contention": dict(self.contention_),
            "prefill_contention": self.prefill_contention_,
            "corrections": {p: c.to_dict() for p, c in self.corrections_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        m = cls(d["total_sms"], d["split_sms"], d.get("attention_heads"))  # absent in older profiles
        m.classes_ = {p: {c: OpClass(**op) for c, op in cl.items()} for p, cl in d["classes"].items()}
        for phase in PHASES:
            if set(m.classes_.get(phase, {})) != set(CLASSES):
                raise ValueError(f"latency model lacks the {phase} operator classes {CLASSES}")
        m.overhead_ms_ = {p: float(v) for p, v in d["overhead_ms"].items()}
        m.contention_ = {k: float(d["contention"][k]) for k in _CONTENTION_TERMS}
        m.prefill_contention_ = float(d.get("prefill_contention", 0.0))  # absent before calibrate fitted it
        m.corrections_ = {p: Correction.from_dict(d["corrections"].get(p, {})) for p in PHASES}
        return m
