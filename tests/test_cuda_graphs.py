"""Which graph a step replays: the bucket that holds it, or a larger one that ran quicker."""
import pytest
import torch

from nexus_tune.engine.cuda_graphs import GraphSet, fastest_buckets

CUDA = torch.cuda.is_available()


def test_fastest_buckets_replaces_a_slow_bucket_by_a_larger_quicker_one():
    # qwen2.5-3b's dense decode on 20 H200 SMs (ms): 16 and 32 rows slower than 64.
    ms = {1: 8.87, 8: 8.93, 16: 10.85, 32: 9.9, 64: 8.84, 128: 12.15}
    assert fastest_buckets(ms) == {16: 64, 32: 64}


def test_fastest_buckets_keeps_own_bucket_within_the_noise_margin():
    ms = {1: 2.41, 4: 2.42, 8: 2.50, 16: 2.50, 32: 2.37, 64: 2.66}  # 32 quicker than 8 by 5.2%, than 1 by 1.7%
    assert fastest_buckets(ms, faster_by=0.05) == {8: 32, 16: 32}
    assert fastest_buckets(ms, faster_by=0.10) == {}
    assert fastest_buckets({4: 1.0, 8: 1.0}) == {}  # ties keep the smaller
    assert fastest_buckets({2: 2.0, 4: 1.0, 8: 0.99}) == {2: 4}  # the smallest within the margin of the quickest


def test_fastest_buckets_monotone_times_change_nothing():
    assert fastest_buckets({b: 1 + b / 100 for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)}) == {}


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_graph_set_replays_the_quicker_larger_bucket():
    """A step whose bucket 2 does far more work than bucket 4: size 2 (and 1) replay bucket 4's graph."""
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    out = {}

    def step(bucket: int, sms: int | None) -> None:
        work = 40 if bucket == 2 else 1
        x = a
        for _ in range(work):
            x = x @ a * 1e-3
        out[bucket] = x

    graphs = GraphSet("test", device, torch.cuda.get_device_properties(device).multi_processor_count,
                      size_gemms=False, quickest=True)
    graphs.capture(step, {"whole": (torch.cuda.Stream(device), None)}, [1, 2, 4, 8])
    assert graphs.replay_ms["whole"][2] > graphs.replay_ms["whole"][4]
    assert graphs.bucket("whole", 2) == 4 and graphs.bucket("whole", 3) == 4  # 8 is no quicker than 4
    assert graphs.bucket("whole", 8) == 8 and graphs.bucket("whole", 9) is None


def test_graph_set_refuses_a_library_choice_for_sized_gemms():
    """Sized GEMMs are captured on cuBLASLt (the SM-count target is its setting): nothing to choose."""
    with pytest.raises(ValueError, match="cuBLASLt"):
        GraphSet("decode", torch.device("cpu"), 132, size_gemms=True, quickest=True)
