"""Which GPU this is: identity through NVML, SM count through CUDA, software versions.

`identify()` never raises for a machine without an NVIDIA GPU: it returns a `NoGPU` with the
reason, which is falsy, so callers write `dev = identify(); if not dev: print(dev.reason)`.
torch, pynvml and cuda-bindings are imported inside the functions so that importing this
module (profiles do, to read a stored `DeviceInfo`) stays cheap on CPU-only commands.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    slug: str
    sm_count: int
    memory_bytes: int
    compute_capability: tuple[int, int]
    driver_version: str
    cuda_version: str

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceInfo:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"GPU identity lacks field(s) {', '.join(missing)}: {d!r}")
        values = {n: d[n] for n in names}
        values["compute_capability"] = tuple(values["compute_capability"])
        return cls(**values)


@dataclass(frozen=True)
class NoGPU:
    """No usable NVIDIA GPU; `reason` says why in words a user can act on."""

    reason: str

    def __bool__(self) -> bool:
        return False


class _Unavailable(Exception):
    pass


def slugify(name: str) -> str:
    """A stable path component for a GPU name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3".

    Lower-case ASCII letters and digits joined by single dashes, vendor prefix dropped;
    idempotent, so a slug read back from a profile path maps to itself.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"^(nvidia-)+", "", slug)
    return slug or "unknown-gpu"


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    try:
        import pynvml
    except ImportError as e:
        raise _Unavailable("pynvml is not installed (pip install nvidia-ml-py)") from e
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise _Unavailable(f"NVML could not start ({e}): no NVIDIA driver on this machine") from e
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returned bytes before 11.5
    return value.decode() if isinstance(value, bytes) else value


def _cuda_version(nvml: Any) -> str:
    v = nvml.nvmlSystemGetCudaDriverVersion()  # 13000 means 13.0
    return f"{v // 1000}.{v % 1000 // 10}"


def _sm_count(index: int) -> int:
    """NVML has no SM-count query on every version: ask torch, else the driver API."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(index).multi_processor_count
    try:
        from cuda.bindings import driver as cu

        (err,) = cu.cuInit(0)
        if err == cu.CUresult.CUDA_SUCCESS:
            err, dev = cu.cuDeviceGet(index)
        if err == cu.CUresult.CUDA_SUCCESS:
            attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            err, count = cu.cuDeviceGetAttribute(attr, dev)
        if err == cu.CUresult.CUDA_SUCCESS:
            return int(count)
        reason = f"cuda-bindings failed with {err.name}"
    except Exception as e:  # ImportError, or a driver library cuda-bindings cannot load
        reason = f"cuda-bindings unusable ({e})"
    raise _Unavailable(f"torch has no CUDA (build {torch.__version__}) and {reason}: cannot read the SM count")


def identify(index: int = 0) -> DeviceInfo | NoGPU:
    """The GPU at CUDA index `index`, or NoGPU(reason). A bad index on a GPU machine is a ValueError.

    NVML is asked by the same index, which is the CUDA index unless CUDA_VISIBLE_DEVICES reorders GPUs.
    """
    try:
        with _nvml() as nvml:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return NoGPU("NVML runs but sees no GPU")
            if not 0 <= index < count:
                raise ValueError(f"device {index} does not exist: this machine has {count} GPU(s), 0..{count - 1}")
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
            return DeviceInfo(
                index=index,
                name=name,
                slug=slugify(name),
                sm_count=_sm_count(index),
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
                cuda_version=_cuda_version(nvml),
            )
    except _Unavailable as e:
        return NoGPU(str(e))


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions that change measured timings; None for what is not installed or not reachable."""
    import torch

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "cuda_bindings": _dist_version("cuda-bindings"),
        "nvidia_ml_py": _dist_version("nvidia-ml-py"),
        "driver": None,
        "cuda": None,
    }
    with contextlib.suppress(_Unavailable), _nvml() as nvml:
        versions["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        versions["cuda"] = _cuda_version(nvml)
    return versions
