"""Per-request records and the serving metrics vLLM's benchmark computes from them.

Definitions follow vLLM's `benchmarks/benchmark_serving.py` (`vllm bench serve`):
TTFT = first token - send; TPOT = (E2EL - TTFT) / (output tokens - 1), over requests with
more than one output token; ITL = every gap between streamed tokens; E2EL = finish - send.
Goodput counts requests per second that meet every SLO given (a request with one output
token has TPOT 0 for this purpose, as in vLLM). All latencies in ms, instants in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
# Capacity: the highest arrival rate at which at least this share of requests meets the SLOs.
ATTAINMENT_TARGET = 0.9


@dataclass
class RequestRecord:
    """One request's life; bench, engine and simulator all produce these."""

    request_id: str
    arrival_s: float  # when the request was sent (or arrived, in the simulator)
    prompt_tokens: int
    output_tokens: int = 0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # every streamed token, the first included
    finish_s: float | None = None
    success: bool = False
    error: str = ""

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.arrival_s) * 1e3

    @property
    def e2el_ms(self) -> float:
        return (self.finish_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float:
        """0 for a single output token (vLLM's convention for goodput)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) * 1e3 / (self.output_tokens - 1)

    @property
    def itls_ms(self) -> list[float]:
        return (np.diff(self.token_times_s) * 1e3).tolist()

    @property
    def done(self) -> bool:
        """Finished successfully with a first token: the latencies above are defined."""
        return self.success and self.first_token_s is not None and self.finish_s is not None


def parse_slos(spec: str | list[str] | dict | None) -> dict[str, float]:
    """`"ttft=3000,tpot=50"`, `["ttft:3000", "tpot:50"]` or a dict -> `{"ttft": 3000.0, "tpot": 50.0}` (ms)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
        items = []
        for part in filter(None, (p.strip() for p in parts)):
            key, sep, value = part.replace(":", "=").partition("=")
            if not sep:
                raise ValueError(f"SLO {part!r}: expected NAME=MS (or NAME:MS), e.g. ttft=3000")
            items.append((key.strip(), value))
    slos = {}
    for key, value in items:
        if key not in SLO_METRICS:
            raise ValueError(f"SLO {key!r}: the names are {', '.join(SLO_METRICS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"SLO {key}={value!r}: not a number of milliseconds") from None
        # 0 no request meets; inf and NaN limit nothing (leave the metric out instead).
        if not 0 < slos[key] < math.inf:
            raise ValueError(f"SLO {key}={value}: must be a positive, finite number of ms")
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    if not record.done:
        return False
    return all(getattr(record, f"{name}_ms") <= limit for name, limit in slos.items())


def slo_attainment(records: list[RequestRecord], slos: dict[str, float]) -> float:
    """Share of ALL requests (failed and unfinished count against) that meet every SLO."""
    if not records:
        return 0.0
    return sum(meets_slos(r, slos) for r in records) / len(records)


def capacity(attainment_by_rate: dict[float, float]) -> float | None:
    """The highest rate tried whose SLO attainment reaches ATTAINMENT_TARGET (None if none does)."""
    good = [rate for rate, att in attainment_by_rate.items() if att >= ATTAINMENT_TARGET]
    return max(good, default=None)


def _stats(name: str, values: list[float]) -> dict[str, float]:
    arr = np.asarray(values or [0.0], dtype=float)  # vLLM reports 0 when nothing was measured
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """vLLM's result fields (`mean_ttft_ms`, `p99_tpot_ms`, `request_throughput`, ...) from records."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    done = [r for r in records if r.done]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    result: dict = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in done)
        result["request_goodput"] = good / duration_s  # vLLM's name
        result["goodput"] = result["request_goodput"]  # the short name docs/architecture.md uses
        result["slo_attainment"] = slo_attainment(records, slos)
    else:
        result["request_goodput"] = result["goodput"] = None
    samples = {
        "ttft": [r.ttft_ms for r in done],
        "tpot": [r.tpot_ms for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itls_ms],
        "e2el": [r.e2el_ms for r in done],
    }
    for name in LATENCY_METRICS:
        result.update(_stats(name, samples[name]))
    return result
