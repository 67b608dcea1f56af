"""`PhaseRunner`: what the profiler needs from an engine to time real model steps.

The protocol lives in the core; the engine implements it (engine.model_runner.ModelRunner) and
the profiler (nexus_tune/commands/profiler.py) drives it. Each method prepares random inputs up
front and returns a callable that runs one step on the stream it is given, so the timed region
holds only the GPU work of that step. `part` is one of latency_model.PARTS: the whole step, only
the attention kernels (+ KV writes) of every layer, or only the rest.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

Step = Callable[[Any], None]  # called with a torch.cuda.Stream (None on a CPU)


@runtime_checkable
class PhaseRunner(Protocol):
    num_layers: int

    def prefill_fn(self, tokens: int, kv_prefix: int, part: str, stream: "torch.cuda.Stream | None" = None,
                   sms: int | None = None) -> Step:
        """A prefill step: one sequence's chunk of `tokens` new tokens attending to `kv_prefix` cached ones,
        captured as a CUDA graph on `stream` with GEMMs sized for `sms` SMs (None: the whole GPU), as the
        engine runs it; the callable replays it."""
        ...

    def decode_fn(self, batch: int, kv_tokens: int, part: str, stream: "torch.cuda.Stream | None" = None,
                  sms: int | None = None) -> Step:
        """A decode step of `batch` sequences reading `kv_tokens` KV tokens in total, captured and
        replayed as `prefill_fn`'s (a graph keeps the SMs of the stream it was captured on)."""
        ...
