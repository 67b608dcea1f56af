"""Every disjoint (prefill SMs, decode SMs) split of one GPU, pre-created as pairs of streams.

Why the driver API and not torch.cuda.green_contexts: GreenContext.create(num_sms) carves each
context out of the whole device on its own, so two of them run on the SAME SMs (docs/gpu-facts.md:
two 64-SM contexts ran at half speed together). cuDevSmResourceSplitByCount returns one group
AND the remaining SMs, which are disjoint by construction:

    cuDeviceGetDevResource(SM) -> cuDevSmResourceSplitByCount(1, res, 0, P) -> (group, remaining)
    each side: cuDevResourceGenerateDesc -> cuGreenCtxCreate -> cuGreenCtxStreamCreate
               -> torch.cuda.ExternalStream

Kernels launched on a side's stream (PyTorch, cuBLAS, Triton, CUDA graphs captured there) run
on that side's SMs only. Creating a split costs milliseconds, so all of them are made at start
and a scheduler switches split by choosing which stream pair to launch on.

Threads: a new Python thread has no current CUDA context, and cuBLAS then fails with "no
current CUDA context". Call `table.bind_thread()` first in every worker thread that launches
on the table's streams.

Where green contexts are unavailable the table falls back to time-sharing: one "split" whose
two sides are ordinary streams on the whole GPU (None on a CPU), announced once per process.

The split arithmetic is pure and the CUDA side sits behind `CudaDriver`, so tests drive the
table on a CPU with a fake driver. torch and cuda-bindings are imported lazily: profiles and
the simulator use the arithmetic without paying for them.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

GREEN_CONTEXTS = "green-contexts"
TIME_SHARING = "time-sharing"
# H100's values, used only when the driver/bindings do not report the fields (and said so).
ASSUMED_GRANULARITY = 8


class GreenContextError(RuntimeError):
    """Green contexts cannot be used here; the message says why."""


class TimeSharingWarning(RuntimeWarning):
    """Prefill and decode share every SM: no isolation between the phases."""


# ---------------------------------------------------------------------------------------------
# Split arithmetic (pure)


@dataclass(frozen=True)
class Granularity:
    total_sms: int
    min_partition: int  # minSmPartitionSize: the smallest group the driver creates
    alignment: int  # smCoscheduledAlignment: group sizes are multiples of it
    from_device: bool = True  # False: the fields were missing and ASSUMED_GRANULARITY is used

    def __post_init__(self) -> None:
        if min(self.total_sms, self.min_partition, self.alignment) < 1:
            raise ValueError(f"SM counts must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"total_sms": self.total_sms, "min_partition": self.min_partition,
                "alignment": self.alignment, "from_device": self.from_device}


def granularity_of(resource: Any) -> Granularity:
    """Read a CUdevResource of type SM. Drivers/bindings before CUDA 12.8-13 lack the two fields
    (or leave them 0); then each missing one is ASSUMED_GRANULARITY and from_device is False."""
    sm = resource.sm
    minimum = int(getattr(sm, "minSmPartitionSize", 0) or 0)
    alignment = int(getattr(sm, "smCoscheduledAlignment", 0) or 0)
    return Granularity(
        total_sms=int(sm.smCount),
        min_partition=minimum or ASSUMED_GRANULARITY,
        alignment=alignment or ASSUMED_GRANULARITY,
        from_device=bool(minimum and alignment),
    )


def group_size(requested: int, g: Granularity) -> int:
    """SMs in the group the driver makes when asked for `requested`: at least the minimum
    partition, rounded up to the alignment (H100: 1..8 -> 8, 10..16 -> 16)."""
    wanted = max(requested, g.min_partition)
    return -(-wanted // g.alignment) * g.alignment


def split_sizes(g: Granularity) -> list[int]:
    """Prefill SM counts of every disjoint split: prefill is the driver's group (a multiple of the
    alignment), decode the remaining SMs, and both sides need at least the minimum partition.

    132 SMs at 8/8 -> 8, 16, ..., 120 (decode 124 down to 12): 128 would leave decode 4 SMs, and
    124 is no multiple of 8, so asking for it yields 128.
    """
    return list(range(group_size(1, g), g.total_sms - g.min_partition + 1, g.alignment))


# ---------------------------------------------------------------------------------------------
# The driver seam


@dataclass(frozen=True)
class Side:
    """One side of a split as a driver made it: the SMs it got, its stream, what to destroy."""

    sms: int
    stream: Any  # torch.cuda.ExternalStream for the real driver
    handle: Any


class Driver(Protocol):
    def granularity(self) -> Granularity: ...
    def create_split(self, prefill_sms: int) -> tuple[Side, Side]: ...
    def destroy(self, side: Side) -> None: ...


class CudaDriver:
    """Green contexts through cuda.bindings.driver. Every CUresult is checked; a failure raises
    GreenContextError naming the call and the error."""

    def __init__(self, device: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise GreenContextError(f"torch {torch.__version__} sees no CUDA GPU")
        try:
            from cuda.bindings import driver as cu
        except ImportError as e:
            raise GreenContextError("cuda-bindings is not installed (pip install cuda-bindings)") from e
        if not hasattr(cu, "cuDevSmResourceSplitByCount"):
            raise GreenContextError("this cuda-bindings has no green-context API (needs 12.4 or newer)")
        self._cu = cu
        self.device = device
        # Green contexts retain the primary context; make it live first so each creation does
        # not initialise and tear it down again (driver docs of cuGreenCtxCreate).
        torch.cuda.set_device(device)
        torch.cuda.synchronize(device)
        try:
            init = cu.cuInit(0)
        except Exception as e:  # cuda-bindings raises when it cannot load libcuda
            raise GreenContextError(f"cuda-bindings cannot load the CUDA driver ({e})") from e
        self._check(init, "cuInit")
        self._dev = self._check(cu.cuDeviceGet(device), "cuDeviceGet")
        sm_type = cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        self._resource = self._check(cu.cuDeviceGetDevResource(self._dev, sm_type), "cuDeviceGetDevResource")

    def _check(self, result: tuple, call: str) -> Any:
        """cuda.bindings returns (CUresult, *values): raise on error, else the value(s)."""
        err, *values = result
        if err != self._cu.CUresult.CUDA_SUCCESS:
            _, text = self._cu.cuGetErrorString(err)
            detail = text.decode() if isinstance(text, bytes) else text
            raise GreenContextError(f"{call} failed: {getattr(err, 'name', err)} ({detail})")
        return values[0] if len(values) == 1 else values or None

    def granularity(self) -> Granularity:
        return granularity_of(self._resource)

    def create_split(self, prefill_sms: int) -> tuple[Side, Side]:
        groups, count, remaining = self._check(
            self._cu.cuDevSmResourceSplitByCount(1, self._resource, 0, prefill_sms),
            f"cuDevSmResourceSplitByCount(1, SM resource, 0, {prefill_sms})")
        if count != 1:
            raise GreenContextError(f"asked the driver for one group of {prefill_sms} SMs, got {count}")
        prefill = self._side(groups[0])
        try:
            return prefill, self._side(remaining)
        except GreenContextError:
            self.destroy(prefill)
            raise

    def _side(self, resource: Any) -> Side:
        import torch

        cu = self._cu
        desc = self._check(cu.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
        ctx = self._check(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                          "cuGreenCtxCreate")
        try:
            stream = self._check(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                                 "cuGreenCtxStreamCreate")
        except GreenContextError:
            self._check(cu.cuGreenCtxDestroy(ctx), "cuGreenCtxDestroy")
            raise
        torch_stream = torch.cuda.ExternalStream(int(stream), device=torch.device("cuda", self.device))
        return Side(sms=int(resource.sm.smCount), stream=torch_stream, handle=(ctx, stream))

    def destroy(self, side: Side) -> None:
        # Streams first: destroying a green context detaches (does not destroy) its streams.
        ctx, stream = side.handle
        self._check(self._cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        self._check(self._cu.cuStreamDestroy(stream), "cuStreamDestroy")
        self._check(self._cu.cuGreenCtxDestroy(ctx), "cuGreenCtxDestroy")


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Split:
    prefill_sms: int
    decode_sms: int
    prefill_stream: Any  # torch.cuda.Stream, or None on a CPU
    decode_stream: Any
    disjoint: bool  # False under time-sharing: both sides run on every SM


_fallback_announced = False


def _announce_fallback(reason: str) -> None:
    global _fallback_announced
    if _fallback_announced:
        return
    _fallback_announced = True
    message = (f"green contexts unavailable ({reason}): prefill and decode will TIME-SHARE the "
               "whole GPU, without SM isolation")
    warnings.warn(message, TimeSharingWarning, stacklevel=3)
    from rich.console import Console

    Console(stderr=True).print(f"[bold yellow]nexus-tune: {message}[/]", soft_wrap=True)


def _free_memory(device: int) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


class SplitTable:
    """All splits of one device, by prefill SM count, plus `whole` (a stream on every SM).

    backend "auto" uses green contexts where it can and time-sharing otherwise (warned once per
    process unless warn=False); "green-contexts" raises GreenContextError instead of falling back;
    "time-sharing" asks for the fallback. `driver` replaces CudaDriver (tests pass a fake).
    Streams are valid until close(); use the table as a context manager or call close().
    """

    def __init__(self, device: int = 0, backend: str = "auto", driver: Driver | None = None,
                 warn: bool = True) -> None:
        if backend not in ("auto", GREEN_CONTEXTS, TIME_SHARING):
            raise ValueError(f"backend must be auto, {GREEN_CONTEXTS} or {TIME_SHARING}, not {backend!r}")
        import torch

        if torch.cuda.is_available() and not 0 <= device < torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
        self.device = device
        # A stream on every SM (None on a CPU), for whole-GPU policies and baselines.
        self.whole = torch.cuda.Stream(device) if torch.cuda.is_available() else None
        self.granularity: Granularity | None = None
        self.fallback_reason: str | None = None
        self._driver: Driver | None = None
        self._sides: list[Side] = []
        self._splits: dict[int, Split] = {}
        self._closed = False
        start, free_before = time.perf_counter(), _free_memory(device)
        try:
            if backend == TIME_SHARING:
                raise GreenContextError("time-sharing was asked for")
            self._create_splits(driver or CudaDriver(device))
            self.backend = GREEN_CONTEXTS
        except GreenContextError as e:
            if backend == GREEN_CONTEXTS:
                raise
            self._time_share(str(e))
            if warn and backend == "auto":
                _announce_fallback(str(e))
        free_after = _free_memory(device)
        self.creation_s = time.perf_counter() - start
        self.memory_bytes = None if free_before is None or free_after is None else free_before - free_after

    def _create_splits(self, driver: Driver) -> None:
        g = driver.granularity()
        if not g.from_device:
            warnings.warn(f"the driver does not report minSmPartitionSize/smCoscheduledAlignment; assuming "
                          f"{g.min_partition}/{g.alignment} (the H100 values)", RuntimeWarning, stacklevel=3)
        sizes = split_sizes(g)
        if not sizes:
            raise GreenContextError(f"{g.total_sms} SMs cannot hold two partitions of {g.min_partition}")
        self._driver, self.granularity, self.total_sms = driver, g, g.total_sms
        try:
            for requested in sizes:
                self._add(*driver.create_split(requested))
        except GreenContextError as e:
            self._destroy_sides()
            raise GreenContextError(f"creating the split of {requested} prefill SMs: {e}") from e

    def _add(self, prefill: Side, decode: Side) -> None:
        # Keyed by what the driver gave, not what was asked: it rounds up, so two requests can land
        # on one size; the second pair is not needed.
        if prefill.sms in self._splits:
            self._driver.destroy(prefill)
            self._driver.destroy(decode)
            return
        self._sides += [prefill, decode]
        self._splits[prefill.sms] = Split(prefill.sms, decode.sms, prefill.stream, decode.stream, True)

    def _time_share(self, reason: str) -> None:
        import torch

        self.backend, self.fallback_reason, self.granularity = TIME_SHARING, reason, None
        self._splits.clear()
        if torch.cuda.is_available():
            self.total_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            streams = [torch.cuda.Stream(self.device) for _ in range(2)]
        else:
            self.total_sms, streams = 0, [None, None]
        self._splits[self.total_sms] = Split(self.total_sms, self.total_sms, *streams, False)

    @property
    def split_sms(self) -> list[int]:
        """Prefill SM counts of every split, ascending (what profiles store)."""
        return sorted(self._splits)

    def __iter__(self) -> Iterator[Split]:
        self._check_open()
        return iter([self._splits[p] for p in self.split_sms])

    def __len__(self) -> int:
        return len(self._splits)

    def __getitem__(self, prefill_sms: int) -> Split:
        self._check_open()
        if prefill_sms not in self._splits:
            raise KeyError(f"no split with {prefill_sms} prefill SMs; this table has {self.split_sms}")
        return self._splits[prefill_sms]

    def nearest(self, prefill_sms: float) -> Split:
        """The split whose prefill SM count is closest; a tie goes to fewer prefill SMs."""
        self._check_open()
        return self._splits[min(self.split_sms, key=lambda p: (abs(p - prefill_sms), p))]

    def bind_thread(self) -> None:
        """Make the table's device current in the calling thread; call first in every worker thread."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(self.device)

    def close(self) -> None:
        """Destroy the streams and green contexts this table created. Idempotent."""
        if not self._closed:
            self._closed = True
            self._destroy_sides()
            self._splits.clear()

    def _destroy_sides(self) -> None:
        while self._sides:
            self._driver.destroy(self._sides.pop())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SplitTable is closed")

    def __enter__(self) -> SplitTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SplitTable(device={self.device}, backend={self.backend!r}, split_sms={self.split_sms})"
