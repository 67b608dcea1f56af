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

Why decode graphs are captured under both cuBLAS and cuBLASLt: at decode's few rows neither library
wins everywhere (H200, llama-3.1-8b at 64 rows: cuBLASLt's gate_up and down 4-10% quicker on the whole
GPU, the whole decode graph 2.3-2.7%; at 16 rows and on the 92-SM side it loses, down 52 against 41 us;
docs/performance.md). Each (side, bucket) is captured under both, timed, and the quicker graph kept.

Why a decode batch may replay a larger bucket's graph: cuBLAS picks its kernels by shape, and on a
small side a few rows can run slower than many (qwen2.5-3b's layers on 20 H200 SMs: 10.9 ms at 16
rows, 8.8 ms at 64; docs/performance.md). Decode graphs are timed once captured, and a batch replays
the fastest graph that holds it when that is at least FASTER_BY quicker than its own bucket's (padded
rows attend one scratch token: they cost dense work only).
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

FASTER_BY = 0.05  # a larger bucket's graph replaces a batch's own only when this much quicker (noise margin)
TIMED_REPLAYS = 3
BLAS_LIBRARIES = ("cublas", "cublaslt")


def fastest_buckets(ms: dict[int, float], faster_by: float = FASTER_BY) -> dict[int, int]:
    """bucket -> the bucket to replay instead: the smallest of those at least as large that comes within
    `faster_by` of the quickest of them, when it beats the bucket's own time by `faster_by`; buckets
    that keep their own graph are left out."""
    sizes = sorted(ms)
    out = {}
    for i, b in enumerate(sizes):
        quickest = min(ms[c] for c in sizes[i:])
        pick = next(c for c in sizes[i:] if ms[c] <= (1 + faster_by) * quickest)
        if ms[pick] < (1 - faster_by) * ms[b]:
            out[b] = pick
    return out


def event_times_ms(fn: Callable[[Any], object], stream: torch.cuda.Stream, runs: int) -> list[float]:
    """ms of each of `runs` calls of fn(stream), bracketed by CUDA events on `stream`."""
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn(stream)
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


@contextlib.contextmanager
def blas_library(name: str) -> Iterator[None]:
    """torch's preferred BLAS library set to `name` while it lasts (process-wide)."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


@contextlib.contextmanager
def gemms_sized_for(sms: int | None, total_sms: int) -> Iterator[None]:
    """GEMMs launched (or captured) inside run through cuBLASLt aimed at `sms` SMs; None or all
    SMs: the library's defaults. Process-wide while it lasts: use it where no other thread launches."""
    if sms is None or sms >= total_sms or not torch.cuda.is_available():
        yield
        return
    carveout = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(total_sms - sms)
    try:
        with blas_library("cublaslt"):
            yield
    finally:
        torch._C._set_sm_carveout_experimental(carveout)


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


def capture_quickest(step: Callable[[], object], stream: torch.cuda.Stream, pool: Any = None,
                     libraries: Iterable[str] = BLAS_LIBRARIES) -> tuple[torch.cuda.CUDAGraph, dict[str, float]]:
    """`step` captured on `stream` under each BLAS library (unsized GEMMs): the quickest graph, and
    each library's median replay ms (the kept one is the least). The graphs are replayed in turns,
    so a clock that ramps during the timing favours none of them."""
    graphs = {}
    for library in libraries:
        with blas_library(library):
            graphs[library] = capture(step, stream, pool)
    times: dict[str, list[float]] = {library: [] for library in graphs}
    with torch.cuda.stream(stream):
        for graph in graphs.values():
            graph.replay()  # untimed: first replays upload the graph
        for _ in range(TIMED_REPLAYS):
            for library, graph in graphs.items():
                times[library] += event_times_ms(lambda _, g=graph: g.replay(), stream, 1)
    ms = {library: statistics.median(t) for library, t in times.items()}
    return graphs[min(ms, key=ms.get)], ms


@dataclass(frozen=True)
class GraphCaptureReport:
    kind: str
    keys: list[Hashable]
    buckets: list[int]
    num_graphs: int
    seconds: float
    memory_bytes: int  # device memory the graphs and their pool took
    replaced: int = 0  # (side, bucket) pairs that replay a larger bucket's graph
    libraries: dict[str, int] | None = None  # with `quickest`: graphs kept per BLAS library

    def __str__(self) -> str:
        return (f"captured {self.num_graphs} {self.kind} CUDA graphs ({len(self.keys)} split sides x buckets "
                f"{self.buckets}) in {self.seconds:.1f} s using {self.memory_bytes / 2**20:.0f} MiB"
                + (f"; {self.replaced} replay a larger, quicker bucket" if self.replaced else "")
                + ("; kept " + ", ".join(f"{n} on {lib}" for lib, n in self.libraries.items()) if self.libraries else ""))


class GraphSet:
    """Graphs of one step function `step(bucket, sms)` by (side key, bucket), sharing one memory pool;
    with `size_gemms`, their GEMMs sized for the side's SMs; with `quickest`, each graph is the quicker
    of its captures under cuBLAS and cuBLASLt, and a size replays the quickest graph that holds it (timed
    at capture), not always the smallest.

    Graphs of one set must never run at the same time (they share the pool's memory): the prefill
    and the decode set are separate sets, each replayed by one loop at a time.
    """

    def __init__(self, kind: str, device: torch.device, total_sms: int, size_gemms: bool, quickest: bool = False):
        if size_gemms and quickest:
            raise ValueError("sized GEMMs run on cuBLASLt: there is no library to choose")
        self.kind, self.device, self.total_sms, self.size_gemms = kind, device, total_sms, size_gemms
        self.quickest = quickest
        self._graphs: dict[tuple[Hashable, int], torch.cuda.CUDAGraph] = {}
        self._streams: dict[Hashable, torch.cuda.Stream] = {}
        self._buckets: dict[Hashable, list[int]] = {}
        self.library_ms: dict[Hashable, dict[int, dict[str, float]]] = {}  # with quickest: side -> bucket -> library -> ms
        self.replaced: dict[Hashable, dict[int, int]] = {}  # side -> bucket -> the bucket replayed instead
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
                    run = lambda size=size: step(size, sms)
                    if self.quickest:
                        graph, times = capture_quickest(run, stream, self._pool)
                        self.library_ms.setdefault(key, {})[size] = times
                    else:
                        graph = capture(run, stream, self._pool, sms if self.size_gemms else None, self.total_sms)
                    self._graphs[key, size] = graph
                self._streams[key], self._buckets[key] = stream, sizes
                if self.quickest:
                    self.replaced[key] = fastest_buckets(self.replay_ms[key])
                    if self.replaced[key]:
                        log.info("%s graphs on side %r replay larger buckets: %s", self.kind, key, self.replaced[key])
        torch.cuda.synchronize(self.device)
        report = GraphCaptureReport(self.kind, list(sides), sizes, len(sides) * len(sizes), time.perf_counter() - t0,
                                    free_before - torch.cuda.mem_get_info(self.device)[0],
                                    sum(map(len, self.replaced.values())),
                                    dict(Counter(self.library(key, size) for key, sizes in self.library_ms.items()
                                                 for size in sizes)) or None)
        log.info("%s", report)
        return report

    def __contains__(self, key: Hashable) -> bool:
        return key in self._streams

    def stream(self, key: Hashable) -> torch.cuda.Stream:
        if key not in self._streams:
            raise KeyError(f"no {self.kind} graphs were captured for split side {key!r}")
        return self._streams[key]

    def bucket(self, key: Hashable, size: int) -> int | None:
        """The bucket of `key` to replay for `size`: the smallest holding it, or the quicker one that
        replaces it; None if none holds it."""
        own = next((b for b in self._buckets.get(key, ()) if b >= size), None)
        return self.replaced.get(key, {}).get(own, own)

    @property
    def replay_ms(self) -> dict[Hashable, dict[int, float]]:
        """With `quickest`: side -> bucket -> ms of the graph kept (the quicker library's)."""
        return {key: {size: min(t.values()) for size, t in sizes.items()} for key, sizes in self.library_ms.items()}

    def library(self, key: Hashable, bucket: int) -> str:
        """With `quickest`: the BLAS library of the graph kept for (key, bucket)."""
        times = self.library_ms[key][bucket]
        return min(times, key=times.get)

    def replay(self, key: Hashable, bucket: int) -> None:
        self._graphs[key, bucket].replay()

