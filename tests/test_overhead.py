import json
import random
from dataclasses import replace

import pytest

from nexus_tune.core.latency_model import chunk_prefix
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.overhead import (StepOverhead, fit_prefill_contention, predicted_gpu_ms, record_prefix, step_fidelity,
                                     with_beside_decode)
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.simulator import simulate
from nexus_tune.core.workload import make_trace

PROFILE = replace(synthetic_profile(132, 8), kv_capacity_tokens=400_000)
MODEL = PROFILE.latency_model


def decode_record(t: float, seqs: int, kv: int, loop: str = "decode") -> dict:
    return {"loop": loop, "kind": "decode", "sms": 132, "num_seqs": seqs, "prefill_tokens": 0, "prefill_kv": 0,
            "decode_seqs": seqs, "decode_kv": kv, "beside_prefill": 0, "beside_prefill_kv": 0, "start_ms": t,
            "gpu_ms": None, "end_ms": None, "failed": False}


def engine_log(scale: float, fixed: float, per_seq: float, gap: float, n: int, seed: int = 0) -> list[dict]:
    """A decode loop's steps whose cycles follow the overhead law exactly; every tenth gap is the loop
    idling for work (long), which the fit must not take for overhead."""
    rng, t, log = random.Random(seed), 0.0, []
    for i in range(n):
        seqs = rng.randint(1, 64)
        r = decode_record(t, seqs, seqs * rng.randint(100, 4000))
        r["gpu_ms"] = scale * predicted_gpu_ms(r, MODEL) + fixed + per_seq * seqs
        r["end_ms"] = t + r["gpu_ms"]
        t = r["end_ms"] + (gap if i % 10 else 50.0)
        log.append(r)
    return log


def test_fit_recovers_the_terms_and_ignores_idle_gaps():
    fitted = StepOverhead().fit([engine_log(1.2, 0.3, 0.05, gap=0.4, n=300)], MODEL)
    scale, fixed, per_seq = fitted.terms["decode/decode"]
    # The busy gap is a constant: it lands in the fixed term.
    assert (scale, fixed, per_seq) == pytest.approx((1.2, 0.7, 0.05), rel=1e-6, abs=1e-6)
    err = fitted.fit_error["decode/decode"]
    assert err["fitted_mape_pct"] < 1e-3 < err["profile_mape_pct"]
    assert err["steps"] == 299  # the last step has no next one: no cycle


def test_the_fit_weighs_every_step_by_its_relative_error():
    # Short steps that follow the law, and a few long ones 15% off it: an absolute least-squares fit
    # would bend to the long steps and miss every short one; the relative fit keeps them exact.
    log = engine_log(1.0, 1.0, 0.0, gap=0.0, n=100, seed=3)
    t = log[-1]["end_ms"]
    for i in range(5):
        r = decode_record(t, 256, 256 * 8000)
        r["gpu_ms"] = 0.85 * (predicted_gpu_ms(r, MODEL) + 1.0)
        r["end_ms"] = t = t + r["gpu_ms"]
        log.append(r)
    fitted = StepOverhead().fit([log], MODEL)
    misses = [abs(fitted.predict("decode/decode", predicted_gpu_ms(r, MODEL), r["num_seqs"]) / r["gpu_ms"] - 1)
              for r in log[:99]]
    assert sorted(misses)[len(misses) // 2] < 0.02  # the median short step within 2%


def test_a_key_with_too_few_steps_stays_the_prediction():
    fitted = StepOverhead().fit([engine_log(1.5, 1.0, 0.0, gap=0.2, n=20)], MODEL, min_steps=30)
    assert fitted.terms == {}
    assert fitted.predict("decode/decode", 7.5, 16) == 7.5


def test_runs_on_their_own_clocks_are_not_interleaved():
    # Two engines' logs both start at t=0: read as one timeline, their steps would overlap and the
    # gaps (hence the fixed term) would come out wrong.
    logs = [engine_log(1.2, 0.3, 0.05, gap=0.4, n=150, seed=s) for s in (1, 2)]
    scale, fixed, per_seq = StepOverhead().fit(logs, MODEL).terms["decode/decode"]
    assert (scale, fixed, per_seq) == pytest.approx((1.2, 0.7, 0.05), rel=1e-6, abs=1e-6)


def test_failed_and_untimed_steps_are_left_out():
    log = engine_log(1.0, 0.0, 0.0, gap=0.1, n=100)
    log[5]["failed"] = True
    log[6]["gpu_ms"] = None
    fitted = StepOverhead().fit([log], MODEL)
    assert fitted.fit_error["decode/decode"]["steps"] == 97


def test_round_trip_and_validation():
    fitted = StepOverhead().fit([engine_log(1.1, 0.2, 0.01, gap=0.3, n=100)], MODEL)
    again = StepOverhead.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again.terms == fitted.terms and again.fit_error == fitted.fit_error
    with pytest.raises(ValueError, match="negative"):
        StepOverhead.from_dict({"terms": {"decode/decode": [1.0, -0.5, 0.0]}})


def test_profiles_keep_the_overhead_and_old_ones_have_none(tmp_path):
    overhead = StepOverhead({"decode/decode": (1.1, 0.4, 0.02)})
    path = replace(PROFILE, step_overhead=overhead).save(tmp_path / "p.json")
    assert Profile.load(path).step_overhead.terms == {"decode/decode": (1.1, 0.4, 0.02)}
    raw = json.loads(path.read_text())
    del raw["step_overhead"]  # a profile written before the field existed
    path.write_text(json.dumps(raw))
    assert Profile.load(path).step_overhead is None


def test_mixed_prediction_degenerates_to_its_parts():
    assert MODEL.predict_mixed(0, 0, 8, 8000, 132) == MODEL.predict_decode(8, 8000, 132)
    assert MODEL.predict_mixed(512, 100, 0, 0, 132) == MODEL.predict_prefill(512, 100, 132)
    both = MODEL.predict_mixed(512, 0, 8, 8000, 132)
    assert both > MODEL.predict_prefill(520, 0, 132)  # the decode rows' attention on top


def test_packed_prompt_chunks_are_priced_by_the_pairs_they_attend():
    # two chunks of 256: one over a 4096-token prefix, one fresh; records saved before steps carried
    # their pairs keep the summed prefix
    pairs = 256 * 4096 + 2 * (256 * 257 // 2)
    record = {"kind": "prefill", "sms": 132, "prefill_tokens": 512, "prefill_kv": 4096, "prefill_pairs": pairs,
              "decode_seqs": 0, "decode_kv": 0, "beside_prefill": 0, "beside_prefill_kv": 0}
    assert record_prefix(record) == chunk_prefix(512, pairs) == round((pairs - 512 * 513 / 2) / 512)
    assert predicted_gpu_ms(record, MODEL) == MODEL.predict_prefill(512, record_prefix(record), 132)
    assert predicted_gpu_ms(record, MODEL) < MODEL.predict_prefill(512, 4096, 132)
    assert record_prefix({**record, "prefill_pairs": 0}) == 4096
    assert chunk_prefix(512, 512 * 300 + 512 * 513 // 2) == 300  # one chunk keeps its prefix
    assert chunk_prefix(0, 0) == 0 and chunk_prefix(512, 2 * 256 * 257 // 2) == 0  # fresh prompts packed: 0


@pytest.mark.parametrize("policy, key", [("nexus", "decode/decode"), ("chunked", "mixed/decode"),
                                         ("prefill-first", "single/decode")])
def test_the_simulator_pays_the_overhead_of_its_step_kind(policy, key):
    trace = make_trace("sharegpt-synth", 40, 2.0, seed=3)
    bare = simulate(PROFILE, trace, policy).summary({})
    identity = simulate(replace(PROFILE, step_overhead=StepOverhead({key: (1.0, 0.0, 0.0)})), trace, policy)
    assert identity.summary({}) == bare
    slower = simulate(replace(PROFILE, step_overhead=StepOverhead({key: (1.0, 2.0, 0.0)})), trace, policy)
    assert slower.summary({})["mean_tpot_ms"] > bare["mean_tpot_ms"] + 1.0
    other = simulate(replace(PROFILE, step_overhead=StepOverhead({"no/such": (3.0, 5.0, 1.0)})), trace, policy)
    assert other.summary({}) == bare


def test_step_fidelity_scores_kernel_time_and_cycle_per_step_kind():
    log = engine_log(1.2, 0.3, 0.05, gap=0.4, n=300)
    fitted = StepOverhead().fit([log], MODEL)
    fid = step_fidelity([log], MODEL, fitted)["decode/decode"]
    assert fid["steps"] == 299 and fid["fitted"]
    assert fid["cycle"]["median_pct"] < 1e-3 and fid["cycle"]["p90_pct"] < 1e-3 and fid["cycle"]["within_pct"] == 100
    # Kernel time: the engine ran 1.2x the profile plus more per step: every step > 1/6 slower than predicted.
    assert fid["kernel"]["bias_pct"] < -100 / 6 and fid["kernel"]["within_pct"] == 0
    assert fid["kernel"]["median_pct"] == pytest.approx(-fid["kernel"]["bias_pct"])
    bare = step_fidelity([log], MODEL)["decode/decode"]  # no overhead: the cycle is the kernel prediction
    assert not bare["fitted"] and bare["cycle"]["median_pct"] > 100 / 6


def test_step_fidelity_counts_the_share_within_the_bound():
    log = engine_log(1.05, 0.0, 0.0, gap=0.0, n=100)  # every step 5% above the profile: 4.8% under-predicted
    kernel = step_fidelity([log], MODEL)["decode/decode"]["kernel"]
    assert kernel["median_pct"] == pytest.approx(100 * (1 - 1 / 1.05)) and kernel["within_pct"] == 100
    assert step_fidelity([log], MODEL, within=0.04)["decode/decode"]["kernel"]["within_pct"] == 0


def test_step_fidelity_benchmark_scores_the_second_half_of_each_run_with_split(tmp_path, capsys):
    from benchmarks import step_fidelity as bench

    runs = tmp_path / "runs"
    runs.mkdir()
    logs = [engine_log(1.2, 0.3, 0.05, gap=0.4, n=200, seed=s) for s in (1, 2)]
    record = {"kind": "calibration", "meta": {"model": PROFILE.model["name"]},
              "runs": [{"policy": "nexus", "step_records": log} for log in logs]}
    (runs / "steps.json").write_text(json.dumps(record))
    first, second = bench.halves(logs[0])
    assert first and second and max(r["start_ms"] for r in first) < min(r["start_ms"] for r in second)
    assert len(first) + len(second) == len(logs[0])
    profile = replace(PROFILE, step_overhead=StepOverhead({"decode/decode": (1.0, 0.0, 0.0)})).save(tmp_path / "p.json")
    for extra, cycle_error in (([], "large"), (["--split"], "none")):
        assert bench.main(["--profile", str(profile), "--runs", str(runs), "--out", str(tmp_path), *extra]) == 0
        assert "decode/decode" in capsys.readouterr().out
        kinds = json.loads(next(tmp_path.glob("step_fidelity_*.json")).read_text())["kinds"]
        median = kinds["decode/decode"]["cycle"]["median_pct"]
        # The profile's identity overhead misses the 1.2x law; fitted on the first halves, it holds on the second.
        assert median > 10 if cycle_error == "large" else median < 1e-3
        steps = kinds["decode/decode"]["steps"]
        assert steps == 398 if not extra else 100 < steps < 300  # with --split: the second halves only


def test_prefill_steps_are_split_by_whether_the_decode_loop_ran_beside_them():
    from benchmarks.step_fidelity import host_per_step, prefill_beside_decode

    def prefill(t: float, slow: float) -> dict:
        r = _prefill_record(t, 104, 1.0)
        r["gpu_ms"] = slow * MODEL.predict_prefill(2048, 0, 104)
        r["end_ms"] = t + r["gpu_ms"]
        return r

    beside, alone = prefill(0.0, 1.2), prefill(1000.0, 1.0)
    recorded = dict(prefill(2000.0, 1.1), beside_decode=4)  # a log that recorded it: taken as recorded
    decode = [dict(decode_record(t, 8, 8000), gpu_ms=5.0, end_ms=t + 5.0) for t in range(0, int(beside["end_ms"]), 5)]
    rows = prefill_beside_decode(PROFILE, [[beside, alone, recorded, *decode]])
    assert [(r["decode_loop"], r["steps"]) for r in rows] == [("beside", 2), ("idle", 1)]
    assert [r["measured_over_profile"] for r in rows] == pytest.approx([1.15, 1.0])
    # The decode loop's back-to-back steps cost nothing beyond their GPU span; the prefill loop's first
    # gap (to the step 1000 ms later) is an idle wait, counted as the median gap.
    host = host_per_step([[beside, alone, recorded, *decode]])
    assert host["decode/decode"]["median_ms"] == 0.0 and host["prefill/prefill"]["steps"] == 2


def _prefill_record(t: float, sms: int, gpu_ms: float, **extra) -> dict:
    return {"loop": "prefill", "kind": "prefill", "sms": sms, "num_seqs": 1, "prefill_tokens": 2048, "prefill_kv": 0,
            "decode_seqs": 0, "decode_kv": 0, "beside_prefill": 0, "beside_prefill_kv": 0, "start_ms": t,
            "gpu_ms": gpu_ms, "end_ms": t + gpu_ms, "failed": False, **extra}


def test_calibration_recovers_how_much_a_running_decode_slows_prefill():
    rng = random.Random(0)
    log, t = [], 0.0
    for i in range(40):  # steps 1 + 0.9 x decode share slower than the profile's prefill alone, 2% noise
        sms, beside = (104, 8) if i % 2 else (112, 16)
        slower = (1 + 0.9 * (132 - sms) / 132) * rng.uniform(0.98, 1.02)
        log.append(_prefill_record(t, sms, MODEL.predict_prefill(2048, 0, sms) * slower, beside_decode=beside))
        t += 100.0
    alone = _prefill_record(t, 104, MODEL.predict_prefill(2048, 0, 104) * 1.5, beside_decode=0)  # not fitted on
    assert fit_prefill_contention([[*log, alone]], MODEL) == pytest.approx(0.9, abs=0.05)
    assert fit_prefill_contention([[alone]], MODEL) == 0.0
    calibrated = LatencyModel.from_dict(MODEL.to_dict())
    calibrated.prefill_contention_ = fit_prefill_contention([log], MODEL)
    misses = [abs(predicted_gpu_ms(r, calibrated) / r["gpu_ms"] - 1) for r in log]
    assert max(misses) < 0.04 < max(abs(predicted_gpu_ms(r, MODEL) / r["gpu_ms"] - 1) for r in log)


def test_logs_saved_before_prefill_steps_recorded_the_decode_beside_them_are_read_from_overlap():
    prefill_beside = _prefill_record(0.0, 104, 20.0)
    prefill_alone = _prefill_record(100.0, 104, 20.0)
    recorded = _prefill_record(200.0, 104, 20.0, beside_decode=0)  # recorded: kept as it is
    decode = [dict(decode_record(t, 8, 8000), gpu_ms=4.0, end_ms=t + 4.0) for t in (*range(0, 20, 4), *range(200, 220, 4))]
    marked = {r["start_ms"]: r for r in with_beside_decode([prefill_beside, prefill_alone, recorded, *decode])
              if r["loop"] == "prefill"}
    assert (marked[0.0]["beside_decode"], marked[100.0]["beside_decode"], marked[200.0]["beside_decode"]) == (1, 0, 0)
    assert "beside_decode" not in prefill_beside  # the caller's records are left as they were
