"""Device identity: slugs, DeviceInfo round trips, NVML through a fake pynvml, the no-GPU answer."""
import json
import platform
import re
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nexus_tune.core import device
from nexus_tune.core.device import DeviceInfo, NoGPU, identify, slugify, software_versions

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")

H100 = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", slug="h100-80gb-hbm3", sm_count=132,
                  memory_bytes=85520809984, compute_capability=(9, 0), driver_version="580.159.04",
                  cuda_version="13.0")


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "gh200-480gb"),
    ("NVIDIA B200", "b200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada-generation"),
    ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
    ("  nvidia  h100__80gb ", "h100-80gb"),
    ("", "unknown-gpu"),
])
def test_slug(name, slug):
    assert slugify(name) == slug
    assert slugify(slug) == slug


@given(st.text())
def test_slug_is_idempotent_and_path_safe(name):
    slug = slugify(name)
    assert slugify(slug) == slug
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug)


def test_device_info_round_trips_through_json():
    d = json.loads(json.dumps(H100.to_dict()))
    assert d["compute_capability"] == [9, 0]
    assert DeviceInfo.from_dict(d) == H100
    assert DeviceInfo.from_dict({**d, "added_later": 1}) == H100  # newer writers may add fields
    assert H100.memory_gib == pytest.approx(79.6, abs=0.1)


def test_device_info_missing_field_is_a_clear_error():
    d = H100.to_dict()
    del d["sm_count"]
    with pytest.raises(ValueError, match="lacks field.*sm_count"):
        DeviceInfo.from_dict(d)


def test_no_gpu_is_falsy():
    assert not NoGPU("because")
    assert H100


def fake_nvml(count=1, name=b"NVIDIA H100 80GB HBM3", cuda=13000):
    """pynvml as nvidia-ml-py exposes it, for a machine with `count` H100s."""
    m = types.ModuleType("pynvml")
    m.NVMLError = type("NVMLError", (Exception,), {})
    m.calls = []
    m.nvmlInit = lambda: m.calls.append("init")
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetName = lambda h: name
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=85520809984, free=1, used=2)
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    m.nvmlSystemGetDriverVersion = lambda: "580.159.04"
    m.nvmlSystemGetCudaDriverVersion = lambda: cuda
    return m


def test_identify_through_nvml(monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(device, "_sm_count", lambda index: 132)
    assert identify(0) == H100
    assert nvml.calls == ["init", "shutdown"]


def test_identify_formats_cuda_version_and_str_names(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(name="NVIDIA H200", cuda=12080))
    monkeypatch.setattr(device, "_sm_count", lambda index: 132)
    info = identify(0)
    assert (info.slug, info.cuda_version) == ("h200", "12.8")


def test_identify_bad_index_and_empty_machine(monkeypatch):
    monkeypatch.setattr(device, "_sm_count", lambda index: 132)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=2))
    with pytest.raises(ValueError, match=r"device 2 does not exist.*0\.\.1"):
        identify(2)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=0))
    assert identify(0) == NoGPU("NVML runs but sees no GPU")


def test_identify_nvml_failure_is_no_gpu(monkeypatch):
    nvml = fake_nvml()

    def fail():
        raise nvml.NVMLError("Driver Not Loaded")

    nvml.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    result = identify()
    assert not result and "Driver Not Loaded" in result.reason


def test_identify_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    result = identify()
    assert not result and "nvidia-ml-py" in result.reason


@no_gpu
def test_identify_on_this_cpu_machine():
    result = identify()
    assert isinstance(result, NoGPU) and result.reason


@no_gpu
def test_gpu_seen_by_nvml_but_no_cuda_stack(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    result = identify()
    assert not result and "cannot read the SM count" in result.reason


def test_software_versions():
    v = software_versions()
    assert {"python", "torch", "torch_cuda", "triton", "cuda_bindings", "nvidia_ml_py", "driver", "cuda"} <= set(v)
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert v["torch_cuda"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_identify_real_gpu():
    info = identify(0)
    assert info and info.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    assert info.slug == slugify(info.name)
