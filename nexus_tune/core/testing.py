"""Synthetic profiles for tests and CPU benchmarks: an H100-like Llama-3.1-8B latency model
(docs/gpu-facts.md) and a profile of noisy samples drawn from it on the profiler's grid. Marked
`"synthetic": true`; never written under the repository's profiles/.
"""
from __future__ import annotations
import math
import sys
import numpy as np
from nexus_tune.core.latency_model import LatencyModel, OpClass
from nexus_tune.core.partition import Granularity, split_sizes
from nexus_tune.core.profile import Profile, model_slug

# -- synthetic profiles (tests only) ----------------------------------------------------------
# Parameters that reproduce docs/gpu-facts.md for Llama-3.1-8B on an H100 (132 SMs) within ~7%:
# prefill 2048 tokens 314/88/64/57 ms on 16/64/112/128 SMs and 46.5 on the whole GPU; decode
# 64 x 2048 KV 28.8/15.9/12.5/12.0 ms on 16/32/64/132 SMs; about +30% decode under a prefill.
# Prefill launches eagerly (~20 ms of Python per step, docs/performance.md), decode replays a
# CUDA graph.
_LLAMA_8B_H100 = {
    "classes": {
        "prefill": {
            "attention": OpClass([1.3, 0.3], 0.3, 1.0, [0.05], 0.15, 6.5, t0_ms=0.1, launch_ms=6.0, whole=0.9),
            "dense": OpClass([16.9], 0.2, 1.5, [1.42, 0.43], 0.15, 6.5, t0_ms=0.5, launch_ms=14.0, whole=0.81),
        },
        "decode": {
            "attention": OpClass([0.004, 0.5, 0.002], 0.3, 3.0, [0.01422, 0.05], 0.15, 6.5, t0_ms=0.1,
                                 launch_ms=0.02, whole=1.0),
            "dense": OpClass([25.0], 0.3, 3.0, [1.63, 0.3], 0.15, 6.5, t0_ms=0.3, launch_ms=0.02, whole=1.0),
        },
    },
    "overhead_ms": {"prefill": 0.2, "decode": 0.05},
    "contention": {"base": 0.15, "weights": 5.0, "activations": 2.0, "attention": 2.0},
}


def synthetic_latency_model(total_sms: int = 132, granularity: int = 8, scale: float = 1.0) -> LatencyModel:
    """The H100-like model of docs/gpu-facts.md; `scale` multiplies every time (0.4 is roughly a 3B model)."""
    m = LatencyModel(total_sms, split_sizes(Granularity(total_sms, granularity, granularity)))
    truth = _LLAMA_8B_H100
    m.classes_ = {
        phase: {c: OpClass([a * scale for a in p.compute], p.r_sat, p.decay, [b * scale for b in p.memory],
                           p.mem_r_sat, p.mem_decay, p.t0_ms * scale, p.launch_ms * scale, p.whole)
                for c, p in classes.items()}
        for phase, classes in truth["classes"].items()
    }
    m.overhead_ms_ = {k: v * scale for k, v in truth["overhead_ms"].items()}
    m.contention_ = dict(truth["contention"])
    return m


def synthetic_profile(total_sms: int = 132, granularity: int = 8, model_name: str = "llama-3.1-8b",
                      scale: float = 1.0, kv_capacity_tokens: int = 400_000, noise: float = 0.02,
                      seed: int = 0, config_hash: str = "synthetic", quick: bool = True) -> Profile:
    """A profile whose latency model is the synthetic truth, with samples drawn from it on the
    profiler's grid (quick by default) with log-normal noise of `noise`. Tests only."""
    from nexus_tune.core.grid import plan_grid  # the profiler imports this module

    if noise < 0 or scale <= 0:
        raise ValueError("noise must be >= 0 and scale > 0")
    gran = Granularity(total_sms, granularity, granularity, from_device=False)
    splits = split_sizes(gran)
    truth = synthetic_latency_model(total_sms, granularity, scale)
    plan = plan_grid(splits, total_sms, kv_capacity_tokens, quick, truth.predict_part)
    rng = np.random.default_rng(seed)
    samples = []
    for p in plan.points:
        if p.prefill_tokens:
            ms = truth.predict_decode(p.size, p.kv, p.sms, p.prefill_tokens, p.prefill_kv)
        else:
            ms = truth.predict_part(p.phase, p.part, p.size, p.kv, p.sms)
        samples.append(p.sample(ms * math.exp(rng.normal(0.0, noise))))
    gpu = {"index": 0, "name": f"Synthetic GPU ({total_sms} SMs)", "slug": f"synthetic-{total_sms}sm",
           "sm_count": total_sms, "memory_bytes": 80 * 2**30, "compute_capability": [9, 0],
           "driver_version": "synthetic", "cuda_version": "synthetic"}
    return Profile(
        gpu=gpu, model={"name": model_name, "slug": model_slug(model_name), "config_hash": config_hash},
        granularity=gran.to_dict(), split_sms=splits, kv_capacity_tokens=kv_capacity_tokens,
        latency_model=truth, samples=samples, fit_error=truth.errors(s for s in samples if s.holdout),
        software={"python": sys.version.split()[0]}, grid=plan.describe(), synthetic=True,
    )
