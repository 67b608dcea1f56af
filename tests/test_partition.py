"""SplitTable on a CPU: split arithmetic against fake SM resources, a fake driver, the real
CudaDriver over fake bindings, the fallback; on a GPU, the SM ids each side really runs on."""
import enum
import itertools
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nexus_tune.core import partition
from nexus_tune.core.partition import (GREEN_CONTEXTS, TIME_SHARING, CudaDriver, GreenContextError, Granularity, Side,
                                       SplitTable, TimeSharingWarning, granularity_of, group_size, split_sizes)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


def fake_resource(sms, minimum=None, alignment=None):
    """A CUdevResource of type SM as cuda.bindings exposes it; None leaves a field out (old bindings)."""
    sm = SimpleNamespace(smCount=sms)
    if minimum is not None:
        sm.minSmPartitionSize = minimum
    if alignment is not None:
        sm.smCoscheduledAlignment = alignment
    return SimpleNamespace(sm=sm)


class FakeDriver:
    """Splits like the driver: the group takes the lowest SM ids, rounded up; the rest is remaining.
    A side's stream is the frozenset of its SM ids, so tests can check disjointness."""

    def __init__(self, resource, fail_at=None, round_to=None):
        self.resource, self.fail_at, self.round_to = resource, fail_at, round_to
        self.live: set[int] = set()
        self.destroyed: list[int] = []
        self._next = 0

    def granularity(self):
        return granularity_of(self.resource)

    def create_split(self, prefill_sms):
        if prefill_sms == self.fail_at:
            raise GreenContextError("cuGreenCtxCreate failed: CUDA_ERROR_OUT_OF_MEMORY")
        g = self.granularity()
        p = self.round_to or group_size(prefill_sms, g)
        return self._side(range(p)), self._side(range(p, g.total_sms))

    def _side(self, ids):
        self._next += 1
        self.live.add(self._next)
        return Side(sms=len(ids), stream=frozenset(ids), handle=self._next)

    def destroy(self, side):
        self.live.remove(side.handle)
        self.destroyed.append(side.handle)


@pytest.fixture(autouse=True)
def fresh_announcement(monkeypatch):
    monkeypatch.setattr(partition, "_fallback_announced", False)


# -- arithmetic --------------------------------------------------------------------------------

def test_h100_132_sms_granularity_8():
    g = granularity_of(fake_resource(132, 8, 8))
    assert g == Granularity(132, 8, 8, from_device=True)
    assert split_sizes(g) == list(range(8, 121, 8))  # 128 would leave decode 4 SMs
    assert [g.total_sms - p for p in split_sizes(g)][-1] == 12
    # docs/gpu-facts.md: asking for 1..8 SMs gives 8, 10..16 gives 16
    assert {group_size(n, g) for n in range(1, 9)} == {8}
    assert {group_size(n, g) for n in range(10, 17)} == {16}
    assert {group_size(n, g) for n in range(20, 25)} == {24}
    assert group_size(124, g) == 128


def test_78_sms_granularity_2():
    sizes = split_sizes(granularity_of(fake_resource(78, 2, 2)))
    assert sizes == list(range(2, 77, 2))
    assert len(sizes) == 38


def test_min_partition_larger_than_alignment():
    assert split_sizes(Granularity(40, 8, 4)) == [8, 12, 16, 20, 24, 28, 32]


def test_too_few_sms_for_two_partitions():
    assert split_sizes(Granularity(12, 8, 8)) == []


def test_missing_fields_assume_8_and_say_so():
    assert granularity_of(fake_resource(132)) == Granularity(132, 8, 8, from_device=False)
    assert granularity_of(fake_resource(132, 0, 0)).from_device is False  # fields present, left 0
    assert granularity_of(fake_resource(132, 4, None)) == Granularity(132, 4, 8, from_device=False)


def test_granularity_rejects_nonsense():
    with pytest.raises(ValueError):
        Granularity(132, 0, 8)


granularities = st.builds(
    lambda t, m, a: Granularity(t, m, a),
    st.integers(1, 300), st.integers(1, 40), st.integers(1, 32),
)


@given(granularities)
def test_every_split_is_valid(g):
    sizes = split_sizes(g)
    assert sizes == sorted(set(sizes))
    for p in sizes:
        assert p % g.alignment == 0
        assert p >= g.min_partition
        assert g.total_sms - p >= g.min_partition


@given(granularities)
def test_splits_are_exactly_what_requests_can_yield(g):
    reachable = {group_size(n, g) for n in range(1, g.total_sms + 1)}
    assert set(split_sizes(g)) == {p for p in reachable if g.total_sms - p >= g.min_partition}


class FakeBindings(ModuleType):
    """cuda.bindings.driver as far as CudaDriver calls it, over a device whose SMs have ids 0..total-1.
    Like the driver, a split's group takes the lowest ids of the resource split, rounded up to the
    granularity, and the remaining resource holds the others. A green context remembers the ids of
    the resource its descriptor was made from, and a stream those of its context: `streams` says
    which SMs each live stream runs on."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0

    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM="sm")
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
    OK = CUresult.CUDA_SUCCESS

    def __init__(self, total: int, align: int):
        super().__init__("cuda.bindings.driver")
        self.granularity = Granularity(total, align, align)
        self._handles = itertools.count(1)
        self.contexts: dict[int, frozenset[int]] = {}
        self.streams: dict[int, frozenset[int]] = {}

    def _resource(self, ids) -> SimpleNamespace:
        """An SM resource holding `ids`, with the device's granularity fields."""
        g = self.granularity
        return SimpleNamespace(sm=fake_resource(len(ids), g.min_partition, g.alignment).sm, ids=frozenset(ids))

    def cuInit(self, flags):
        return (self.OK,)

    def cuDeviceGet(self, index):
        return self.OK, index

    def cuDeviceGetDevResource(self, device, kind):
        return self.OK, self._resource(range(self.granularity.total_sms))

    def cuDevSmResourceSplitByCount(self, groups, resource, flags, min_count):
        ids, size = sorted(resource.ids), group_size(min_count, self.granularity)
        return self.OK, [self._resource(ids[:size])], 1, self._resource(ids[size:])

    def cuDevResourceGenerateDesc(self, resources, count):
        return self.OK, frozenset().union(*(r.ids for r in resources))

    def cuGreenCtxCreate(self, desc, device, flags):
        handle = next(self._handles)
        self.contexts[handle] = desc
        return self.OK, handle

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        handle = next(self._handles)
        self.streams[handle] = self.contexts[ctx]
        return self.OK, handle

    def cuStreamSynchronize(self, stream):
        return (self.OK,)

    def cuStreamDestroy(self, stream):
        del self.streams[stream]
        return (self.OK,)

    def cuGreenCtxDestroy(self, ctx):
        del self.contexts[ctx]
        return (self.OK,)


def cuda_driver_over(bindings: FakeBindings, mp: pytest.MonkeyPatch) -> CudaDriver:
    """The real CudaDriver, its bindings replaced by `bindings` and torch's CUDA calls by stand-ins
    (a side's stream is then its driver stream handle)."""
    package = ModuleType("cuda.bindings")
    package.driver = bindings
    root = ModuleType("cuda")
    root.bindings = package
    for name, module in (("cuda", root), ("cuda.bindings", package), ("cuda.bindings.driver", bindings)):
        mp.setitem(sys.modules, name, module)
    mp.setattr(torch.cuda, "ExternalStream", lambda handle, device: handle)
    with pytest.MonkeyPatch.context() as gpu:  # only while it starts: SplitTable itself stays on the CPU
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "set_device", lambda device: None)
        gpu.setattr(torch.cuda, "synchronize", lambda device=None: None)
        return CudaDriver(0)


@given(st.integers(16, 200), st.sampled_from([1, 2, 4, 8]))
def test_table_splits_disjoint_and_cover_the_device(total, align):
    """CudaDriver's own code builds each side from what the driver split off: the group for prefill,
    the remaining SMs for decode. So the two streams of every split run on disjoint SMs that cover
    the device, each side's count is its resource's, and close() destroys every stream and context."""
    bindings = FakeBindings(total, align)
    with pytest.MonkeyPatch.context() as mp:
        with SplitTable(driver=cuda_driver_over(bindings, mp)) as table:
            assert table.backend == GREEN_CONTEXTS
            assert table.split_sms == split_sizes(bindings.granularity)
            for split in table:
                prefill, decode = bindings.streams[split.prefill_stream], bindings.streams[split.decode_stream]
                assert split.disjoint and not prefill & decode
                assert prefill | decode == frozenset(range(total))
                assert (split.prefill_sms, split.decode_sms) == (len(prefill), len(decode))
        assert not bindings.streams and not bindings.contexts


# -- the table with a fake driver ----------------------------------------------------------------

def test_table_on_fake_h100():
    driver = FakeDriver(fake_resource(132, 8, 8))
    table = SplitTable(driver=driver)
    assert table.backend == GREEN_CONTEXTS and table.fallback_reason is None
    assert table.total_sms == 132 and table.granularity.alignment == 8
    assert len(table) == 15 and len(driver.live) == 30
    assert [(s.prefill_sms, s.decode_sms) for s in table][:2] == [(8, 124), (16, 116)]
    assert table[64].decode_sms == 68
    assert table.nearest(60).prefill_sms == 56 and table.nearest(61).prefill_sms == 64
    assert table.nearest(60.0).prefill_sms == 56  # a tie goes to fewer prefill SMs
    assert table.nearest(1).prefill_sms == 8 and table.nearest(500).prefill_sms == 120
    assert table.creation_s >= 0
    with pytest.raises(KeyError, match="no split with 60 prefill SMs"):
        table[60]
    table.close()
    assert driver.live == set() and len(driver.destroyed) == 30
    table.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        table.nearest(64)


def test_actual_counts_are_recorded_and_duplicates_dropped():
    driver = FakeDriver(fake_resource(132, 8, 8), round_to=16)  # a driver that always gives 16
    with SplitTable(driver=driver) as table:
        assert table.split_sms == [16]
        assert table[16].decode_sms == 116
        assert len(driver.live) == 2  # the 14 duplicate pairs were destroyed at once
    assert driver.live == set()


def test_driver_without_granularity_fields_warns():
    with pytest.warns(RuntimeWarning, match="assuming 8/8"):
        table = SplitTable(driver=FakeDriver(fake_resource(132)))
    assert table.backend == GREEN_CONTEXTS and table.granularity.from_device is False
    table.close()


def test_bind_thread_never_raises():
    with SplitTable(driver=FakeDriver(fake_resource(132, 8, 8))) as table:
        table.bind_thread()


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        SplitTable(backend="mps")


# -- the fallback ------------------------------------------------------------------------------

def test_failure_midway_falls_back_and_cleans_up(recwarn):
    driver = FakeDriver(fake_resource(132, 8, 8), fail_at=40)
    table = SplitTable(driver=driver)
    assert table.backend == TIME_SHARING
    assert "40 prefill SMs" in table.fallback_reason and "OUT_OF_MEMORY" in table.fallback_reason
    assert driver.live == set() and len(driver.destroyed) == 8  # the 4 splits made before 40
    assert table.granularity is None
    assert len([w for w in recwarn if w.category is TimeSharingWarning]) == 1


def test_strict_backend_raises_instead():
    with pytest.raises(GreenContextError, match="40 prefill SMs"):
        SplitTable(driver=FakeDriver(fake_resource(132, 8, 8), fail_at=40), backend=GREEN_CONTEXTS)


def test_device_too_small_falls_back():
    with pytest.warns(TimeSharingWarning, match="12 SMs cannot hold two partitions of 8"):
        table = SplitTable(driver=FakeDriver(fake_resource(12, 8, 8)))
    assert table.backend == TIME_SHARING


@no_gpu
def test_cpu_falls_back_and_warns_once(recwarn, capsys):
    first, second = SplitTable(), SplitTable()
    for table in (first, second):
        assert table.backend == TIME_SHARING
        assert "sees no CUDA GPU" in table.fallback_reason
        assert len(table) == 1 and table.whole is None
        (split,) = table
        assert not split.disjoint
        assert split.prefill_stream is None and split.decode_stream is None
        assert table.nearest(64) is split
        table.bind_thread()
        table.close()
    warned = [w for w in recwarn if w.category is TimeSharingWarning]
    assert len(warned) == 1 and "TIME-SHARE" in str(warned[0].message)
    assert "TIME-SHARE" in capsys.readouterr().err  # the rich line, also once
    assert first.memory_bytes is None


@no_gpu
def test_time_sharing_on_request_does_not_warn(recwarn):
    table = SplitTable(backend=TIME_SHARING)
    assert table.backend == TIME_SHARING and table.fallback_reason == "time-sharing was asked for"
    assert not [w for w in recwarn if w.category is TimeSharingWarning]


@no_gpu
def test_quiet_fallback(recwarn):
    SplitTable(warn=False)
    assert not [w for w in recwarn if w.category is TimeSharingWarning]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_real_gpu_sides_run_on_disjoint_sms():
    """Green contexts for real (backend green-contexts raises instead of falling back to time-sharing),
    and on every split the SM ids that programs launched on each side read (%smid) are disjoint and
    no more than the side's count, and each side spreads over most of its SMs (else a disjoint pair
    of small id sets would prove nothing)."""
    from benchmarks.partition_check import sm_ids  # Triton: imported only on a GPU

    with SplitTable(backend=GREEN_CONTEXTS) as table:
        assert table.split_sms == split_sizes(table.granularity)
        programs = 256 * table.total_sms
        for split in table:
            prefill, decode = (sm_ids(s, programs, table.device) for s in (split.prefill_stream, split.decode_stream))
            assert not prefill & decode, (split.prefill_sms, sorted(prefill & decode))
            assert split.prefill_sms // 2 < len(prefill) <= split.prefill_sms, (split.prefill_sms, len(prefill))
            assert split.decode_sms // 2 < len(decode) <= split.decode_sms, (split.decode_sms, len(decode))
