import numpy as np
import pytest

from nexus_tune.core.metrics import RequestRecord, capacity, parse_slos, slo_attainment, summarize


def record(rid, arrival, times, prompt=100, success=True):
    return RequestRecord(rid, arrival, prompt, output_tokens=len(times), first_token_s=times[0] if times else None,
                         token_times_s=list(times), finish_s=times[-1] if times else None, success=success)


@pytest.fixture
def records():
    return [
        record("a", 0.0, [0.1, 0.12, 0.15, 0.2]),  # TTFT 100, TPOT 100/3, ITL 20/30/50, E2EL 200
        record("b", 1.0, [1.5, 1.6]),              # TTFT 500, TPOT 100, ITL 100, E2EL 600
        record("c", 2.0, [2.05]),                  # TTFT 50, one token: no TPOT, TPOT 0 for goodput
        RequestRecord("d", 3.0, 100, error="HTTP 500"),  # failed
    ]


def test_record_latencies(records):
    a = records[0]
    assert a.ttft_ms == pytest.approx(100)
    assert a.tpot_ms == pytest.approx(100 / 3)
    assert a.itls_ms == pytest.approx([20, 30, 50])
    assert a.e2el_ms == pytest.approx(200)
    assert records[2].tpot_ms == 0.0
    assert not records[3].done


def test_summarize_matches_hand_computed(records):
    s = summarize(records, duration_s=4.0, slos={"ttft": 200, "tpot": 50})
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 300 and s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(7 / 4)
    assert s["total_token_throughput"] == pytest.approx(307 / 4)
    assert s["mean_ttft_ms"] == pytest.approx((100 + 500 + 50) / 3)
    assert s["median_ttft_ms"] == pytest.approx(100)
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile([100, 500, 50], 99))
    # TPOT only over requests with more than one output token (vLLM)
    assert s["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert s["mean_itl_ms"] == pytest.approx((20 + 30 + 50 + 100) / 4)
    assert s["p90_itl_ms"] == pytest.approx(np.percentile([20, 30, 50, 100], 90))
    assert s["median_e2el_ms"] == pytest.approx(200)
    # a (100 ms, 33 ms) and c (50 ms, TPOT 0) meet both SLOs; b misses TTFT; d failed
    assert s["request_goodput"] == pytest.approx(2 / 4)
    assert s["goodput"] == s["request_goodput"]
    assert s["slo_attainment"] == pytest.approx(2 / 4)


def test_summarize_without_slos_or_successes():
    s = summarize([RequestRecord("x", 0.0, 10, error="boom")], 1.0)
    assert s["completed"] == 0 and s["request_goodput"] is None
    assert s["mean_ttft_ms"] == 0.0 and s["p99_itl_ms"] == 0.0


def test_slo_attainment_counts_failures_against(records):
    assert slo_attainment(records, {"ttft": 1000}) == pytest.approx(3 / 4)
    assert slo_attainment(records, {"e2el": 250}) == pytest.approx(2 / 4)
    assert slo_attainment([], {"ttft": 1}) == 0.0


def test_parse_slos_forms():
    assert parse_slos("ttft=3000,tpot=50") == {"ttft": 3000.0, "tpot": 50.0}
    assert parse_slos(["ttft:3000", "tpot:50"]) == {"ttft": 3000.0, "tpot": 50.0}
    assert parse_slos(None) == {} and parse_slos([]) == {}
    for bad in ("ttft", "latency=3", "ttft=abc", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slos(bad)


def test_capacity_is_highest_rate_meeting_target():
    assert capacity({1.0: 1.0, 2.0: 0.95, 3.0: 0.89, 4.0: 0.2}) == 2.0
    assert capacity({1.0: 0.5}) is None
