"""CUDA graphs of the engine's steps: one per (split side, size bucket), with GEMMs sized for that side.

Why graphs for every step: an eager step launches ~15 kernels per layer from Python, and the host
time that costs (and the GIL the two loop threads share) ran in series with the GPU: prefill steps
cost 12-28 ms more than their kernels on the H100 (docs/performance.md). A replay is one launch.

Why one graph per split side: a graph keeps the SMs of the stream it was captured on, whatever
stream replays it (docs/gpu-facts.md), so each side a step can run on needs its own graphs.

Why prefill GEMMs are sized at capture: cuBLAS sizes a GEMM's grid for the whole chip, and on a
partition the extra tiles run as another wave (H200: 2048-token GEMMs on 112 SMs took 1.3-2.0x
their proportional time; sized, 0.9-1.05x, docs/performance.md). cuBLASLt takes an SM-count
target; PyTorch sets it process-wide (`preferred_blas_library` plus the SM carveout), so two
loops launching eagerly from two threads would race on it. A graph keeps the kernels chosen while
it was captured, and capture happens once, at start-up, in one thread: `gemms_sized_for` sets the
target around each capture and restores the defaults after. Decode GEMMs (a few rows, bound by
the weights' bytes) stay unsized: on the H200's 92-SM side the sized ones ran 7-35% slower.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gemms_sized_for(sms: int | None, total_sms: int) -> Iterator[None]:
    """GEMMs launched (or captured) inside run through cuBLASLt aimed at `sms` SMs; None or all
    SMs: the library's defaults. Process-wide while it lasts: use it where no other thread launches."""
    if sms is None or sms >= total_sms or not torch.cuda.is_available():
        yield
        return
    library = torch.backends.cuda.preferred_blas_library()
    carveout = torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(total_sms - sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(carveout)
        torch.backends.cuda.preferred_blas_library(library)


def capture(step: Callable[[], object], stream: torch.cuda.Stream, pool: Any = None, sms: int | None = None,
            total_sms: int = 0) -> torch.cuda.CUDAGraph:
    """Run `step` once on `stream` (kernel selection, JIT and lazy init happen outside capture), then
    capture it there, GEMMs sized for `sms`."""
    with gemms_sized_for(sms, total_sms):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (a loop already running) may allocate while this one captures.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            step()
    return graph


@dataclass(frozen=True)
class GraphCaptureReport:
    kind: str
    keys: list[Hashable]
    buckets: list[int]
    num_graphs: int
    seconds: float
    memory_bytes: int  # device memory the graphs and their pool took

    def __str__(self) -> str:
        return (f"captured {self.num_graphs} {self.kind} CUDA graphs ({len(self.keys)} split sides x buckets "
                f"{self.buckets}) in {self.seconds:.1f} s using {self.memory_bytes / 2**20:.0f} MiB")


class GraphSet:
    """Graphs of one step function `step(bucket, sms)` by (side key, bucket), sharing one memory pool;
    with `size_gemms`, their GEMMs sized for the side's SMs.

    Graphs of one set must never run at the same time (they share the pool's memory): the prefill
    and the decode set are separate sets, each replayed by one loop at a time.
    """

    def __init__(self, kind: str, device: torch.device, total_sms: int, size_gemms: bool):
        self.kind, self.device, self.total_sms, self.size_gemms = kind, device, total_sms, size_gemms
        self._graphs: dict[tuple[Hashable, int], torch.cuda.CUDAGraph] = {}
        self._streams: dict[Hashable, torch.cuda.Stream] = {}
        self._buckets: dict[Hashable, list[int]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Callable[[int, int | None], object], sides: dict[Hashable, tuple[Any, int | None]],
                buckets: Iterable[int]) -> GraphCaptureReport:
        """One graph per (side, bucket): `sides` maps a key to (stream, SMs of that side or None for all)."""
        sizes = sorted(set(buckets))
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for key, (stream, sms) in sides.items():
                for size in reversed(sizes):  # largest first: the smaller graphs reuse its pool memory
                    self._graphs[key, size] = capture(lambda size=size: step(size, sms), stream, self._pool,
                                                      sms if self.size_gemms else None, self.total_sms)
                self._streams[key], self._buckets[key] = stream, sizes
        torch.cuda.synchronize(self.device)
        report = GraphCaptureReport(self.kind, list(sides), sizes, len(sides) * len(sizes), time.perf_counter() - t0,
                                    free_before - torch.cuda.mem_get_info(self.device)[0])
        log.info("%s", report)
        return report

    def __contains__(self, key: Hashable) -> bool:
        return key in self._streams

    def stream(self, key: Hashable) -> torch.cuda.Stream:
        if key not in self._streams:
            raise KeyError(f"no {self.kind} graphs were captured for split side {key!r}")
        return self._streams[key]

    def bucket(self, key: Hashable, size: int) -> int | None:
        """The smallest bucket of `key` holding `size`, None if none does."""
        return next((b for b in self._buckets.get(key, ()) if b >= size), None)

    def replay(self, key: Hashable, bucket: int) -> None:
        self._graphs[key, bucket].replay()
