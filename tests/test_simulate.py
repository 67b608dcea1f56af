import json
from dataclasses import replace

import numpy as np
import pytest

from nexus_tune.commands.cli import main
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_latency_model, synthetic_profile
from nexus_tune.commands.simulate import default_policies
from nexus_tune.core.simulator import simulate
from nexus_tune.core.workload import TraceRequest, make_trace

TOTAL = 132
SPLITS = list(range(8, 128, 8))
POLICIES = ["nexus", "chunked", "prefill-first", "static:64"]
SLOS = {"ttft": 3000.0, "tpot": 50.0}
BASE = synthetic_profile(TOTAL, 8)  # an H100 / Llama-3.1-8B-like latency model (docs/gpu-facts.md)


def make_profile(kv_capacity_tokens: int = 400_000, tuned_knobs: dict | None = None, model=None) -> Profile:
    return replace(BASE, kv_capacity_tokens=kv_capacity_tokens, tuned_knobs=tuned_knobs,
                   latency_model=model or BASE.latency_model)


PROFILE = make_profile()
MODEL = PROFILE.latency_model


class Recorder:
    """The model, logging every decode prediction the simulator asks for."""

    def __init__(self, model):
        self.model, self.decode_calls = model, []

    def predict_prefill(self, *args):
        return self.model.predict_prefill(*args)

    def predict_decode(self, batch, kv, sms, prefill_tokens=0, prefill_kv=0):
        self.decode_calls.append((batch, kv, sms, prefill_tokens, prefill_kv))
        return self.model.predict_decode(batch, kv, sms, prefill_tokens, prefill_kv)


def lone(prompt: int, output: int) -> list[TraceRequest]:
    return [TraceRequest("0", 1.0, prompt, output)]


def expected_times(prompt: int, output: int, chunk: int, prefill_sms: int, decode_sms: int) -> list[float]:
    """Token instants of a request alone: TTFT = its prefill chunks back to back on prefill_sms (the first
    token comes out of the last chunk); then one token per decode step on decode_sms."""
    t, done = 1.0, 0
    while done < prompt:
        n = min(chunk, prompt - done)
        t += MODEL.predict_prefill(n, done, prefill_sms) * 1e-3
        done += n
    times = [t]
    for i in range(output - 1):
        t += MODEL.predict_decode(1, prompt + 1 + i, decode_sms) * 1e-3
        times.append(t)
    return times


@pytest.mark.parametrize("policy, prompt, chunk, prefill_sms, decode_sms", [
    ("nexus", 1500, 2048, TOTAL, TOTAL),  # each phase alone gets the whole GPU
    ("nexus", 5000, 2048, TOTAL, TOTAL),  # three chunks of at most 2048
    ("static:64", 1500, 2048, 64, TOTAL - 64),
    ("chunked", 5000, 8192, TOTAL, TOTAL),
    ("prefill-first", 5000, 8192, TOTAL, TOTAL),
])
def test_a_lone_request_follows_the_model_exactly(policy, prompt, chunk, prefill_sms, decode_sms):
    record = simulate(PROFILE, lone(prompt, 20), policy, ControllerKnobs(prefill_chunk_tokens=2048)).records[0]
    expected = expected_times(prompt, 20, chunk, prefill_sms, decode_sms)
    assert record.success and record.output_tokens == 20
    assert record.first_token_s == pytest.approx(expected[0], rel=1e-12)
    assert record.token_times_s == pytest.approx(expected, rel=1e-12)
    assert record.finish_s == record.token_times_s[-1]


def test_a_single_token_request_finishes_at_its_prefill():
    record = simulate(PROFILE, lone(300, 1), "nexus").records[0]
    assert record.success and record.token_times_s == [record.first_token_s] == [record.finish_s]
    assert record.ttft_ms == pytest.approx(MODEL.predict_prefill(300, 0, TOTAL))


def test_decode_beside_a_prefill_is_predicted_with_contention():
    recorder = Recorder(MODEL)
    trace = [TraceRequest("a", 0.0, 100, 200), TraceRequest("b", 0.5, 5000, 2)]
    profile = make_profile(model=recorder)
    result = simulate(profile, trace, "static:64", ControllerKnobs())
    assert all(r.success for r in result.records)
    contended = [c for c in recorder.decode_calls if c[3]]
    assert contended and all(c[2] == TOTAL - 64 for c in contended)
    assert {(c[3], c[4]) for c in contended} <= {(2048, 0), (2048, 2048), (904, 4096)}  # b's chunks


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_seed_gives_the_same_result(policy):
    runs = [simulate(PROFILE, make_trace("sharegpt-synth", 150, 20.0, seed=3), policy) for _ in range(2)]
    assert runs[0].records == runs[1].records
    assert runs[0].summary(SLOS) == runs[1].summary(SLOS)
    other = simulate(PROFILE, make_trace("sharegpt-synth", 150, 20.0, seed=4), policy)
    assert other.records != runs[0].records


@pytest.mark.parametrize("policy", POLICIES)
def test_more_load_gives_higher_latency(policy):
    light, heavy = (simulate(PROFILE, make_trace("mixed", 120, rate, seed=1), policy).summary(SLOS)
                    for rate in (0.5, 8.0))
    assert light["completed"] == heavy["completed"] == 120
    assert heavy["mean_ttft_ms"] > light["mean_ttft_ms"]
    assert heavy["mean_e2el_ms"] > light["mean_e2el_ms"]
    assert heavy["request_throughput"] > light["request_throughput"]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_small_kv_cache_preempts_and_completes_every_request(policy):
    trace = make_trace("sharegpt-synth", 150, 50.0, seed=2)
    result = simulate(make_profile(kv_capacity_tokens=12_000), trace, policy)
    assert result.num_preemptions > 0
    assert all(r.success and r.output_tokens == t.output_tokens and len(r.token_times_s) == t.output_tokens
               for r, t in zip(result.records, trace))


def test_a_request_too_large_for_the_cache_fails_alone():
    trace = [TraceRequest("big", 0.0, 20_000, 10), TraceRequest("ok", 0.0, 100, 10)]
    result = simulate(make_profile(kv_capacity_tokens=16_000), trace, "nexus")
    big, ok = result.records
    assert not big.success and "KV blocks" in big.error and ok.success
    assert result.summary()["failed"] == 1


def test_nexus_switches_splits_and_records_them():
    result = simulate(PROFILE, make_trace("mixed", 150, 4.0, seed=0), "nexus")
    assert result.split_switches == len(result.splits) - 1 > 0
    assert all(p in SPLITS or p in (0, TOTAL) for _, p in result.splits)
    assert [t for t, _ in result.splits] == sorted(t for t, _ in result.splits)
    assert simulate(PROFILE, make_trace("mixed", 50, 4.0), "static:64").split_switches == 0


def test_tuned_knobs_in_the_profile_are_the_default():
    tuned = ControllerKnobs(mode="slo", tbt_ms=30.0, prefill_chunk_tokens=1024)
    trace = make_trace("mixed", 80, 4.0, seed=0)
    from_profile = simulate(make_profile(tuned_knobs=tuned.to_dict()), trace, "nexus")
    explicit = simulate(PROFILE, trace, "nexus", tuned)
    assert from_profile.records == explicit.records
    assert simulate(PROFILE, trace, "nexus").records != explicit.records


def test_summary_has_vllm_fields():
    """vLLM's fields, their values taken from the trace and the simulated records directly."""
    trace = [replace(t, arrival_s=t.arrival_s + 1.0) for t in make_trace("sharegpt-synth", 30, 5.0)]  # not at 0
    result = simulate(PROFILE, trace, "chunked")
    s, records = result.summary(SLOS), result.records
    assert [r.arrival_s for r in records] == [t.arrival_s for t in trace]
    assert all(len(r.token_times_s) == r.output_tokens == t.output_tokens for r, t in zip(records, trace))
    duration = max(r.finish_s for r in records) - trace[0].arrival_s
    assert s["duration"] == pytest.approx(duration) and s["policy"] == "chunked"
    assert (s["completed"], s["failed"]) == (30, 0)
    assert s["total_input_tokens"] == sum(t.prompt_tokens for t in trace)
    assert s["total_output_tokens"] == sum(t.output_tokens for t in trace)
    assert s["request_throughput"] == pytest.approx(30 / duration)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / duration)
    ttfts = [r.first_token_s * 1e3 - r.arrival_s * 1e3 for r in records]
    assert s["mean_ttft_ms"] == pytest.approx(np.mean(ttfts))
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99))
    tpots = [(r.finish_s - r.first_token_s) * 1e3 / (r.output_tokens - 1) for r in records if r.output_tokens > 1]
    assert s["p99_tpot_ms"] == pytest.approx(np.percentile(tpots, 99))
    gaps = [g * 1e3 for r in records for g in np.diff(r.token_times_s)]
    assert s["p99_itl_ms"] == pytest.approx(np.percentile(gaps, 99))
    good = sum(r.ttft_ms <= SLOS["ttft"] and r.tpot_ms <= SLOS["tpot"] for r in records)
    assert s["goodput"] == pytest.approx(good / duration) and s["slo_attainment"] == pytest.approx(good / 30)
    assert (s["num_preemptions"], s["split_switches"]) == (result.num_preemptions, result.split_switches)


def test_default_policies_include_a_middle_static_split():
    assert default_policies(PROFILE) == ["nexus", "chunked", "prefill-first", "static:64"]


def test_cli_prints_a_table_per_policy(tmp_path, capsys):
    path = PROFILE.save(tmp_path / "p.json")
    rc = main(["simulate", "--profile", str(path), "--num-prompts", "40", "--request-rate", "4",
               "--workload", "sharegpt-synth", "--policy", "nexus", "--policy", "chunked"])
    out = capsys.readouterr().out
    assert rc == 0 and "nexus" in out and "chunked" in out and "TTFT" in out


def test_saved_profiles_round_trip_into_the_simulator(tmp_path):
    path = PROFILE.save(tmp_path / "p.json")
    json.loads(path.read_text())  # plain JSON
    trace = make_trace("sharegpt-synth", 20, 5.0)
    assert simulate(Profile.load(path), trace, "nexus").records == simulate(PROFILE, trace, "nexus").records


def test_a_gpu_as_its_profile_says_leaves_the_controller_as_planned():
    """The simulator feeds the controller every step as the engine does; steps exactly as predicted
    are a fixed point of the online correction."""
    trace = make_trace("mixed", 80, 6.0, seed=0)
    assert simulate(PROFILE, trace, "nexus").records == simulate(PROFILE, trace, "nexus", gpu=MODEL).records


@pytest.mark.parametrize("scale, rate", [(1.3, 6.0), (1.3, 9.0), (0.8, 12.0)])
def test_the_controller_learns_a_gpu_unlike_its_profile(scale, rate):
    """Steps take another model's times (a slower or faster GPU than profiled): the controller,
    correcting online, serves about as well as one whose profile was right."""
    gpu = synthetic_latency_model(TOTAL, 8, scale=scale)
    knobs = ControllerKnobs.for_profile(PROFILE, SLOS)
    trace = make_trace("mixed", 150, rate, seed=0)
    learned = simulate(PROFILE, trace, "nexus", knobs, gpu=gpu).summary(SLOS)
    right = simulate(make_profile(model=gpu), trace, "nexus", knobs).summary(SLOS)
    assert learned["slo_attainment"] == pytest.approx(right["slo_attainment"], abs=0.03)
    assert learned["mean_ttft_ms"] == pytest.approx(right["mean_ttft_ms"], rel=0.05)
