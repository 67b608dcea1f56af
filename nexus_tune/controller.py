"""The split controller: step state + `LatencyModel` -> prefill SM count of a pre-created split.

Return values: 0 gives the whole GPU to decode (no prefill waits), `total_sms` gives it to
prefill (nothing decodes), anything else is one of the interior splits the engine pre-created.

Modes (`ControllerKnobs.mode`):
- `paper` (Nexus): while KV-cache use <= kv_threshold, prefill-first: the most prefill SMs whose
  decode step stays within beta x the decode step on decode's largest side of any split; above
  it, decode-first: the fewest prefill SMs whose prefill step stays within alpha x the prefill
  step on prefill's largest side. As in the paper, alpha and beta bound what the SM share costs:
  both sides are predicted without the concurrent other phase (the bandwidth contention every
  split pays would otherwise make a beta near 1 unreachable at any split). The reference is the
  largest partition, not the whole-GPU stream: on the H100 every partition runs decode at least
  ~20% slower than the whole GPU (profiles/h100-80gb-hbm3), so a whole-GPU reference makes
  beta=1.1 unreachable and starves prefill (measured: 13 s p50 TTFT at 1.5 req/s).
- `slo`: the most prefill SMs whose decode step, slowed by the concurrent prefill, stays under the
  TBT target, raised to the fewest prefill SMs that drain the prefill queue before the oldest
  queued request misses its TTFT target.

Every constraint is monotone in the prefill share, so the search gallops over the sorted splits
from the current one (2-4 model evaluations when the answer moved little). Hysteresis: a new
split within delta of the current one is applied only if the current one breaks a constraint
the new one meets.
`decide` is not thread-safe (the scheduler calls it under its lock); `clear_cache` may be called
from any thread.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable, Protocol

MODES = ("paper", "slo")
# KV inputs of the model are rounded up to this many significant bits (at most 1/64 = 1.6% over),
# so consecutive steps, whose KV grows by the decode batch size, share cached predictions; the
# model itself is only good to a few percent.
KV_SIGNIFICANT_BITS = 7
_CACHE_LIMIT = 16384


class LatencyPredictor(Protocol):
    """The part of `latency_model.LatencyModel` the controller reads (milliseconds)."""

    def predict_prefill(self, tokens: int, kv_prefix: int, sms: int) -> float: ...

    def predict_decode(self, batch: int, kv_tokens: int, sms: int, prefill_tokens: int = 0,
                       prefill_kv: int = 0) -> float: ...


@dataclass
class ControllerKnobs:
    """Every tunable knob of the controller and the two-loop scheduler (what `nexus-tune tune` searches)."""

    mode: str = "paper"  # paper | slo
    alpha: float = 1.3  # decode-first: prefill may take up to alpha x its time on its largest side
    beta: float = 1.1  # prefill-first: decode may take up to beta x its time on its largest side
    kv_threshold: float = 0.7  # KV-cache use above which `paper` turns decode-first
    delta: float = 0.05  # hysteresis, as a share of the GPU's SMs
    gamma: float = 15.0  # prefill-queue aging: tokens of priority gained per millisecond waited
    prefill_chunk_tokens: int = 2048  # token budget of one prefill step (nexus and static policies)
    ttft_ms: float = 3000.0  # slo mode targets
    tbt_ms: float = 50.0
    ttft_margin: float = 0.1  # aim this share below the target
    tbt_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"controller mode {self.mode!r}: use one of {', '.join(MODES)}")
        for name in ("alpha", "beta"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be >= 1 (a slowdown bound), got {getattr(self, name)!r}")
        for name in ("kv_threshold", "delta", "ttft_margin", "tbt_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
        if not isinstance(self.prefill_chunk_tokens, int) or self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be a positive integer, got {self.prefill_chunk_tokens!r}")
        for name in ("ttft_ms", "tbt_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ControllerKnobs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown controller knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


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


def quantize_kv(kv: int) -> int:
    """`kv` rounded up to KV_SIGNIFICANT_BITS significant bits."""
    step = 1 << max(int(kv).bit_length() - KV_SIGNIFICANT_BITS, 0)
    return -(-int(kv) // step) * step


class Controller:
    def __init__(self, model: LatencyPredictor, split_sms: Iterable[int], total_sms: int,
                 knobs: ControllerKnobs | None = None):
        self.model = model
        self.total_sms = total_sms
        self.splits = sorted({int(s) for s in split_sms if 0 < s < total_sms})
        if not self.splits:
            raise ValueError(f"no pre-created split strictly between 0 and {total_sms} SMs")
        self.knobs = knobs or ControllerKnobs()
        self.current = 0  # the last decision
        self._index = {sms: i for i, sms in enumerate(self.splits)}
        self._last_interior = 0  # where the next search starts: the last interior decision
        self.evaluations = 0  # model evaluations that missed the cache (for benchmarks)
        self._cache: dict[tuple, float] = {}

    def clear_cache(self) -> None:
        """Call after the model changed (e.g. `LatencyModel.update`)."""
        self._cache.clear()

    def decide(self, s: StepState) -> int:
        """The prefill SM count for the next step."""
        if s.queued_prefill_tokens <= 0:
            self.current = 0
        elif s.decode_batch <= 0:
            self.current = self.total_sms
        else:
            constraints = self._constraints(s)
            target = self._search(constraints)
            if not self._keep_current(target, constraints):
                self.current = self.splits[target]
            self._last_interior = self._index[self.current]
        return self.current

    # -- constraints: (ok(index) -> bool, True if ok holds on a prefix of the splits) --------------

    def _constraints(self, s: StepState) -> list[tuple[Callable[[int], bool], bool]]:
        k = self.knobs
        p_t = max(s.prefill_tokens, 1)
        kv_p, kv_d = quantize_kv(s.prefill_kv), quantize_kv(s.decode_kv)

        def decode_ms(sms: int, contended: bool = False) -> float:
            load = (p_t, kv_p) if contended else (0, 0)
            return self._predict(("d", s.decode_batch, kv_d, sms, *load), self.model.predict_decode,
                                 s.decode_batch, kv_d, sms, *load)

        def prefill_ms(sms: int) -> float:
            return self._predict(("p", p_t, kv_p, sms), self.model.predict_prefill, p_t, kv_p, sms)

        total = self.total_sms
        if k.mode == "paper":
            if s.kv_usage <= k.kv_threshold:  # prefill-first
                bound = k.beta * decode_ms(total - self.splits[0])
                return [(lambda i: decode_ms(total - self.splits[i]) <= bound, True)]
            bound = k.alpha * prefill_ms(self.splits[-1])  # decode-first
            return [(lambda i: prefill_ms(self.splits[i]) <= bound, False)]
        tbt = k.tbt_ms * (1 - k.tbt_margin)
        slack = k.ttft_ms * (1 - k.ttft_margin) - s.oldest_wait_ms
        chunks = math.ceil(s.queued_prefill_tokens / p_t)
        return [(lambda i: decode_ms(total - self.splits[i], contended=True) <= tbt, True),
                (lambda i: chunks * prefill_ms(self.splits[i]) <= slack, False)]

    def _search(self, constraints: list[tuple[Callable[[int], bool], bool]]) -> int:
        """Index of the split: the largest meeting every prefix constraint, raised to the smallest
        meeting every suffix constraint (a constraint met nowhere counts as met at its closest end)."""
        start = self._last_interior
        prefix = [self._walk(ok, True, start) for ok, on_prefix in constraints if on_prefix]
        suffix = [self._walk(ok, False, start) for ok, on_prefix in constraints if not on_prefix]
        return max(min(prefix, default=0), max(suffix, default=0))

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

    def _keep_current(self, target: int, constraints: list[tuple[Callable[[int], bool], bool]]) -> bool:
        here = self._index.get(self.current)
        if here is None:  # coming from a whole-GPU state: always apply
            return False
        if abs(self.splits[target] - self.current) > self.knobs.delta * self.total_sms:
            return False
        return all(ok(here) or not ok(target) for ok, _ in constraints)

    def _predict(self, key: tuple, fn: Callable[..., float], *args) -> float:
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            value = self._cache[key] = float(fn(*args))
            self.evaluations += 1
        return value
