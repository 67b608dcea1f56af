"""The split controller: step state + step times -> prefill SM count of a pre-created split.

Return values: 0 gives the whole GPU to decode (no prefill waits), `total_sms` gives it to
prefill (nothing decodes, or a decode pause: decode waits for one whole-GPU prefill step; the
scheduler's docstring says how the loops honor it), anything else is one of the interior splits
the engine pre-created.

Step times are a loop's cycles as the engine runs them (`overhead.StepTimes`): the profile's
curve under the engine's online correction, plus the host work per step the profile's
StepOverhead holds. A controller that planned with kernel times alone let decode run slower than
it thought by the host time per sequence, and the simulator's tuned knobs had learned to hide
that in their margins.

Modes (`ControllerKnobs.mode`):
- `slo` (the default): prompts waiting get every SM decode can spare: the most prefill SMs whose
  decode step, slowed by the concurrent prefill, fits the TBT allowance, the target (tbt_ms less
  its margin) less what the recent decode steps overran it by (a request's mean TPOT is what
  counts: a run of slow steps, a tail the model did not see coming, is paid back by moving SMs to
  decode: the guard on the TBT tail). Nothing else moves the split: in the simulator, letting the
  queue's TTFT deadlines take SMs from decode when the two conflict (TTFT first, or both sides
  loaded alike), or giving prefill only what the queue needs, carried up to 20% less and never
  more than 1% more, on four setups under Poisson and bursty arrivals, tight TTFT SLOs included
  (docs/performance.md, "Controller rules"): past its saturation prefill gains little from the
  SMs that decode, and every running request, needs. Raising the allowance by the TPOT slack the
  running requests banked, or dropping its margin, moved no capacity either: prefill runs ~4%
  faster per 8 SMs past 104 of 132, so the split barely matters there.
  Decode pause: the whole GPU prefills ~12% faster than the usual split, and TPOT is a request's
  mean, so a request that decoded faster than the target banked slack (`StepState.decode_slack_ms`,
  at `pause_quantile` over the running requests). When that slack covers decode's wait (the
  prefill in flight on the current split, then one step on the whole GPU) plus its next step, and
  the queue would miss its TTFT budget at the current split, decode pauses. Only when the queue is
  late: pausing whenever slack allowed traded TPOT misses (short outputs) for TTFT ones one for
  one on llama Mixed. It carries up to ~2% more on qwen Long Data and synthetic Poisson, nothing
  on llama Mixed, whose decode banks little beside a prefill (docs/performance.md).
- `paper` (Nexus, for the reproduction): while KV-cache use <= kv_threshold, prefill-first: the
  most prefill SMs whose decode step stays within beta x the decode step on decode's largest
  side of any split; above it, decode-first: the fewest prefill SMs whose prefill step stays
  within alpha x the prefill step on prefill's largest side. Each side is predicted without the
  other phase running (contention would make a beta near 1 unreachable at any split). The
  reference is the largest partition, not the whole-GPU stream: on the H100 every partition runs
  decode at least ~20% slower than the whole GPU, and a whole-GPU reference starved prefill.

Each mode's constraint is monotone in the prefill share, so the search gallops over the sorted
splits from the current one (2-4 step-time evaluations when the answer moved little). Hysteresis:
a new split within delta of the current one is applied only if the current one breaks the
constraint the new one meets. `ControllerKnobs.for_profile` derives every knob from a profile and the SLOs:
no tuning needed. `decide` is not thread-safe (the scheduler calls it under its lock).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Protocol

from nexus_tune.core.overhead import StepOverhead, StepTimes

if TYPE_CHECKING:
    from nexus_tune.core.latency_model import LatencyModel

MODES = ("paper", "slo")
DEFAULT_SLOS = {"ttft": 3000.0, "tpot": 50.0}
# KV inputs of the model are rounded up to this many significant bits (at most 1/64 = 1.6% over),
# so consecutive steps, whose KV grows by the decode batch size, share cached predictions; the
# model itself is only good to a few percent.
KV_SIGNIFICANT_BITS = 7
_CACHE_LIMIT = 16384
# Derived knobs (ControllerKnobs.for_profile).
CHUNK_CHOICES = (256, 512, 1024, 2048, 4096, 8192)  # powers of two: the engine's prefill step sizes
CHUNK_EFFICIENCY = 0.05  # a chunk within this of the largest one's prefill cost per token is enough
CHUNK_TTFT_SHARE = 0.1  # and no chunk's step may take more than this share of the TTFT budget
MARGIN_RANGE = (0.05, 0.3)  # SLO margins: twice the profile's held-out error, within this range


class LatencyPredictor(Protocol):
    """Step times in milliseconds: `latency_model.LatencyModel` (kernel time) or `overhead.StepTimes`
    (a loop's cycle); the controller takes either."""

    def predict_prefill(self, tokens: int, kv_prefix: int, sms: int, beside_decode: bool = False) -> float: ...

    def predict_decode(self, batch: int, kv_tokens: int, sms: int, prefill_tokens: int = 0,
                       prefill_kv: int = 0) -> float: ...


@dataclass
class ControllerKnobs:
    """Every knob of the controller and the two-loop scheduler (what `nexus-tune tune` searches).

    The defaults here are for a scheduler without a profile (static splits, tests);
    `for_profile` derives the nexus defaults from the profile and the SLOs."""

    mode: str = "slo"  # slo | paper
    alpha: float = 1.3  # paper, decode-first: prefill may take up to alpha x its time on its largest side
    beta: float = 1.1  # paper, prefill-first: decode may take up to beta x its time on its largest side
    kv_threshold: float = 0.7  # KV-cache use above which `paper` turns decode-first
    delta: float = 0.05  # hysteresis, as a share of the GPU's SMs
    gamma: float = 15.0  # prefill-queue aging: tokens of priority gained per millisecond waited
    prefill_chunk_tokens: int = 2048  # token budget of one prefill step (nexus and static policies)
    ttft_ms: float = DEFAULT_SLOS["ttft"]  # the SLOs: TTFT (what for_profile sizes the prefill chunk for)
    tbt_ms: float = DEFAULT_SLOS["tpot"]  # and TPOT, the slo mode's decode step target
    ttft_margin: float = 0.1  # aim this share below the target
    tbt_margin: float = 0.1
    pause_quantile: float = 0.2  # slo decode pause: the share of running requests whose slack may fall short

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"controller mode {self.mode!r}: use one of {', '.join(MODES)}")
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1 (a slowdown bound), got {getattr(self, name)!r}")
        for name in ("kv_threshold", "delta", "ttft_margin", "tbt_margin", "pause_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
        if not isinstance(self.prefill_chunk_tokens, int) or self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be a positive integer, got {self.prefill_chunk_tokens!r}")
        for name in ("ttft_ms", "tbt_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def tbt_target_ms(self) -> float:
        """The decode step time slo mode plans for: tbt_ms less its margin."""
        return self.tbt_ms * (1 - self.tbt_margin)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ControllerKnobs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown controller knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def with_slos(self, slos: dict[str, float] | None) -> ControllerKnobs:
        """These knobs with the slo-mode targets set from `slos` ({"ttft": ms, "tpot": ms}; others kept)."""
        slos = slos or {}
        return replace(self, ttft_ms=slos.get("ttft", self.ttft_ms), tbt_ms=slos.get("tpot", self.tbt_ms))

    @classmethod
    def for_profile(cls, profile: KnobSource, slos: dict[str, float] | None = None) -> ControllerKnobs:
        """The profile's tuned knobs if it has any, else knobs derived from it, either way with the
        slo-mode targets from `slos` (without: the tuned knobs' own, else DEFAULT_SLOS): what nexus
        runs with, untuned.

        Derived: the prefill chunk (`derive_chunk`), the SLO margins (twice the profile's held-out
        error of the phase, within MARGIN_RANGE), the queue aging (per ms waited, the tokens the
        median split prefills in a ms: a prompt that waited one chunk's step outranks one a chunk
        shorter), and the hysteresis (one split step)."""
        if profile.tuned_knobs:
            return cls.from_dict(profile.tuned_knobs).with_slos(slos)
        targets = {**DEFAULT_SLOS, **(slos or {})}
        times = StepTimes(profile.latency_model, profile.step_overhead)
        splits = sorted(profile.split_sms)
        steps_apart = min((b - a for a, b in zip(splits, splits[1:])), default=splits[0])
        knobs = cls(mode="slo", ttft_ms=targets["ttft"], tbt_ms=targets["tpot"],
                    ttft_margin=_margin(profile.fit_error, "prefill"), tbt_margin=_margin(profile.fit_error, "decode"),
                    delta=steps_apart / int(profile.gpu["sm_count"]))
        chunk = derive_chunk(times, splits, knobs.ttft_ms * (1 - knobs.ttft_margin))
        tokens_per_ms = chunk / times.predict_prefill(chunk, 0, splits[len(splits) // 2])
        return replace(knobs, prefill_chunk_tokens=chunk, gamma=tokens_per_ms)


class KnobSource(Protocol):
    """What `ControllerKnobs.for_profile` reads of a profile (nexus_tune.core.profile.Profile)."""

    tuned_knobs: dict | None
    latency_model: LatencyModel
    step_overhead: StepOverhead | None
    split_sms: list[int]
    fit_error: dict[str, dict[str, float]]
    gpu: dict


def _margin(fit_error: dict[str, dict[str, float]], phase: str) -> float:
    """Twice the profile's held-out error of `phase` (and of decode beside a prefill, for decode),
    within MARGIN_RANGE."""
    names = (phase, "contention") if phase == "decode" else (phase,)
    worst = max((fit_error.get(n, {}).get("mape_pct", 0.0) for n in names), default=0.0) / 100
    return min(max(2 * worst, MARGIN_RANGE[0]), MARGIN_RANGE[1])


def derive_chunk(times: StepTimes, splits: Sequence[int], ttft_budget_ms: float) -> int:
    """The prefill chunk: the smallest of CHUNK_CHOICES that prefills a prompt of the largest
    choice's length, chunk after chunk on the median split's prefill side, within CHUNK_EFFICIENCY
    of the time the largest choice takes (a step's fixed costs, kernel launches and host work,
    amortized; the attention work is the same however the prompt is cut), and whose step takes
    at most CHUNK_TTFT_SHARE of the TTFT budget there (a queued prompt waits for the step in flight)."""
    typical, longest = splits[len(splits) // 2], CHUNK_CHOICES[-1]
    whole = {c: sum(times.predict_prefill(c, i * c, typical) for i in range(longest // c)) for c in CHUNK_CHOICES}
    efficient = [c for c in CHUNK_CHOICES if whole[c] <= (1 + CHUNK_EFFICIENCY) * min(whole.values())]
    fits = [c for c in CHUNK_CHOICES if times.predict_prefill(c, 0, typical) <= CHUNK_TTFT_SHARE * ttft_budget_ms]
    return min(min(efficient), max(fits, default=CHUNK_CHOICES[0]))


@dataclass(frozen=True, slots=True)
class StepState:
    """What the controller reads each step (token counts; ages in ms)."""

    queued_prefill_tokens: int = 0  # prompt tokens not yet prefilled, in-flight chunk included
    prefill_tokens: int = 0  # P_T: tokens of the current / next prefill step
    prefill_kv: int = 0  # KV_p: prefix KV tokens that step reads
    decode_batch: int = 0  # B_d
    decode_kv: int = 0  # KV_d: KV tokens one decode step reads
    kv_usage: float = 0.0  # share of KV blocks in use
    oldest_wait_ms: float = 0.0  # age of the oldest request still waiting for its first token
    decode_slack_ms: float = 0.0  # TPOT slack the running requests banked, at knobs.pause_quantile


def quantize_kv(kv: int) -> int:
    """`kv` rounded up to KV_SIGNIFICANT_BITS significant bits."""
    step = 1 << max(int(kv).bit_length() - KV_SIGNIFICANT_BITS, 0)
    return -(-int(kv) // step) * step


Constraint = tuple[Callable[[int], bool], bool]  # (ok(split index), True if ok holds on a prefix)


class Controller:
    """Picks the split each step (module docstring); `current` is the last decision and `explain()`
    says why (what the engine's /metrics can show)."""

    def __init__(self, model: LatencyModel | StepTimes, split_sms: Iterable[int], total_sms: int,
                 knobs: ControllerKnobs | None = None):
        """`model`: a StepTimes, or a LatencyModel (planned with its kernel times alone)."""
        self.knobs = knobs or ControllerKnobs()
        self.times = model if isinstance(model, StepTimes) else StepTimes(model)
        self.total_sms = total_sms
        self.splits = sorted({int(s) for s in split_sms if 0 < s < total_sms})
        if not self.splits:
            raise ValueError(f"no pre-created split strictly between 0 and {total_sms} SMs")
        self.current = 0  # the last decision
        self.tbt_allowance_ms: float | None = None  # slo mode: the decode step time it allowed
        self._last_state = StepState()
        self._index = {sms: i for i, sms in enumerate(self.splits)}
        self._last_interior = 0  # where the next search starts: the last interior decision
        self.evaluations = 0  # curve evaluations that missed the cache (for benchmarks)
        self._cache: dict[tuple, float] = {}

    def clear_cache(self) -> None:
        """Call after the latency model was refitted. Online updates need none: the cache holds the
        uncorrected curve, and the correction is applied on every use."""
        self._cache.clear()

    def decide(self, s: StepState) -> int:
        """The prefill SM count for the next step."""
        if s.queued_prefill_tokens <= 0:
            self.current = 0
        elif s.decode_batch <= 0 or (self.knobs.mode == "slo" and self._pause(s)):
            self.current = self.total_sms
        else:
            target, constraint = self._slo(s) if self.knobs.mode == "slo" else self._paper(s)
            if not self._keep_current(target, constraint):
                self.current = self.splits[target]
            self._last_interior = self._index[self.current]
        self._last_state = s
        return self.current

    def explain(self) -> dict[str, float | int | None]:
        """The last decision: the split (prefill SMs), each side's predicted step time there (ms;
        None for a side that does not run), the TBT allowance (slo mode) and the recent decode
        cycle. Safe from another thread: it reads the state and evaluates curves uncached."""
        s, p, times = self._last_state, self.current, self.times
        decode_sms = self.total_sms - p if p else self.total_sms
        contended = 0 < p < self.total_sms
        prefill = (times.predict_prefill(max(s.prefill_tokens, 1), s.prefill_kv, p,
                                         beside_decode=contended and s.decode_batch > 0)
                   if p and s.queued_prefill_tokens > 0 else None)
        decode = (times.predict_decode(s.decode_batch, s.decode_kv, decode_sms, *(
            (max(s.prefill_tokens, 1), s.prefill_kv) if contended else (0, 0)))
            if p < self.total_sms and s.decode_batch > 0 else None)
        return {"prefill_sms": p, "predicted_prefill_ms": prefill, "predicted_decode_ms": decode,
                "tbt_allowance_ms": self.tbt_allowance_ms, "recent_decode_ms": times.recent_decode_ms_}

    # -- step times (cached curves, corrected on use) ------------------------------------------

    def _step_times(self, s: StepState, contended: bool) -> tuple[Callable[[int], float], Callable[[int], float]]:
        """(decode step on `sms` SMs, prefill step on `sms` SMs) for this state, memoized for this
        decision (the searches and the hysteresis look at the same splits)."""
        times, curve = self.times, self._curve
        batch, kv_d = s.decode_batch, quantize_kv(s.decode_kv)
        p_t, kv_p = max(s.prefill_tokens, 1), quantize_kv(s.prefill_kv)
        load = (p_t, kv_p) if contended else (0, 0)

        @functools.cache
        def decode_ms(sms: int) -> float:
            return times.cycle_ms("decode", curve(("d", batch, kv_d, sms, *load), "decode", batch, kv_d, sms, *load),
                                  batch)

        @functools.cache
        def prefill_ms(sms: int) -> float:
            return times.cycle_ms("prefill", curve(("p", p_t, kv_p, sms), "prefill", p_t, kv_p, sms), p_t)

        return decode_ms, prefill_ms

    def _curve(self, key: tuple, *args) -> float:
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            value = self._cache[key] = self.times.curve_ms(*args)
            self.evaluations += 1
        return value

    # -- the modes: (split index, the constraint that put it there) ------------------------------

    def _paper(self, s: StepState) -> tuple[int, Constraint]:
        """Each side alone (no contention), against its largest side."""
        k, total, splits = self.knobs, self.total_sms, self.splits
        decode_ms, prefill_ms = self._step_times(s, contended=False)
        if s.kv_usage <= k.kv_threshold:  # prefill-first
            bound = k.beta * decode_ms(total - splits[0])
            constraint = (lambda i: decode_ms(total - splits[i]) <= bound, True)
        else:  # decode-first
            bound = k.alpha * prefill_ms(splits[-1])
            constraint = (lambda i: prefill_ms(splits[i]) <= bound, False)
        return self._walk(*constraint, self._last_interior), constraint

    def _slo(self, s: StepState) -> tuple[int, Constraint]:
        """The most prefill SMs whose decode step, beside the prefill, fits the TBT allowance."""
        total, splits, tbt = self.total_sms, self.splits, self._tbt_allowance()
        decode_ms, _ = self._step_times(s, contended=True)
        constraint = (lambda i: decode_ms(total - splits[i]) <= tbt, True)
        return self._walk(*constraint, self._last_interior), constraint

    def _pause(self, s: StepState) -> bool:
        """A decode pause: the running requests' banked slack covers decode's wait (at most the
        prefill step in flight on the current split, then one on the whole GPU) and its step after
        it, and the queue would miss its TTFT budget at the current split (else the pause buys
        nothing and spends slack that a model error may need)."""
        k, here = self.knobs, self.splits[self._last_interior]
        if s.decode_slack_ms <= k.tbt_target_ms:  # the common case, without a curve
            return False
        _, prefill_ms = self._step_times(s, contended=False)
        if s.decode_slack_ms < prefill_ms(here) + prefill_ms(self.total_sms) + k.tbt_target_ms:
            return False
        drain_ms = s.queued_prefill_tokens / max(s.prefill_tokens, 1) * prefill_ms(here)
        return s.oldest_wait_ms + drain_ms >= k.ttft_ms * (1 - k.ttft_margin)

    def _tbt_allowance(self) -> float:
        """The decode step time allowed now: the target (tbt_ms less its margin), less what the
        recent decode steps overran it by (their mean and the allowance average to the target:
        a run of slow steps, a tail the model did not see coming, is paid back by shifting SMs to
        decode)."""
        target = self.knobs.tbt_target_ms
        recent = self.times.recent_decode_ms_
        self.tbt_allowance_ms = target if recent is None else min(2 * target - recent, target)
        return self.tbt_allowance_ms

    # -- the search ----------------------------------------------------------------------------

    def _walk(self, ok: Callable[[int], bool], on_prefix: bool, start: int) -> int:
        """Boundary index of the region where `ok` holds, by galloping from `start` then bisecting:
        2 evaluations when the boundary has not moved, about 2 log2(distance) otherwise."""
        last = len(self.splits) - 1

        def good(j: int) -> bool:  # `ok` seen from its region: true on a prefix of 0..last
            return ok(j if on_prefix else last - j)

        j = start if on_prefix else last - start
        if good(j):  # gallop up to the first bad index
            lo, hi, step = j, last + 1, 1
            while lo < last:
                probe = min(lo + step, last)
                if not good(probe):
                    hi = probe
                    break
                lo, step = probe, 2 * step
        else:  # gallop down to the first good index
            lo, hi, step = -1, j, 1
            while hi > 0:
                probe = max(hi - step, 0)
                if good(probe):
                    lo = probe
                    break
                hi, step = probe, 2 * step
            if lo < 0:
                return 0 if on_prefix else last  # met nowhere: the closest end
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if good(mid) else (lo, mid)
        return lo if on_prefix else last - lo

    def _keep_current(self, target: int, constraint: Constraint) -> bool:
        """Hysteresis: stay unless the move is larger than delta or the current split breaks the
        constraint the new one meets."""
        here = self._index.get(self.current)
        if here is None:  # coming from a whole-GPU state: always apply
            return False
        if abs(self.splits[target] - self.current) > self.knobs.delta * self.total_sms:
            return False
        ok, _ = constraint
        return ok(here) or not ok(target)
