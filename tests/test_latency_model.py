"""LatencyModel: fit synthetic samples drawn from known parameters back, predict unseen points,
correct online, round-trip as plain data."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nexus_tune.core.latency_model import LatencyModel, OpClass, Sample, share
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_latency_model, synthetic_profile
from nexus_tune.core.grid import split_samples

TOTAL = 132
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def truth() -> LatencyModel:
    return synthetic_latency_model(TOTAL, 8)


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile(TOTAL, 8, noise=0.02, seed=0, quick=False)


@pytest.fixture(scope="module")
def fitted(profile) -> LatencyModel:
    train, _ = split_samples(profile.samples)
    return LatencyModel(TOTAL, profile.split_sms).fit(train)


def _random_points(rng: np.random.Generator, model: LatencyModel, n: int):
    """Unseen (P_T, KV_p) / (B_d, KV_d) points inside the profiled ranges, on allowed SM counts."""
    for _ in range(n):
        if rng.random() < 0.5:
            size, kv = int(rng.integers(128, 8193)), int(rng.integers(0, 8193))
            yield "prefill", size, kv, int(rng.choice(model.sm_choices("prefill")))
        else:
            size = int(rng.integers(1, 257))
            kv = min(size * int(rng.integers(512, 4097)), 360_000)
            yield "decode", size, kv, int(rng.choice(model.sm_choices("decode")))


def test_fit_predicts_unseen_points_within_tolerance(truth, fitted):
    rng = np.random.default_rng(1)
    rel = [abs(fitted.predict(ph, n, kv, s) / truth.predict(ph, n, kv, s) - 1)
           for ph, n, kv, s in _random_points(rng, fitted, 400)]
    assert np.mean(rel) < 0.02
    assert np.max(rel) < 0.10


def test_fit_recovers_identifiable_parameters(truth, fitted):
    for phase, cls, name, tol in [("prefill", "dense", "whole", 0.03), ("prefill", "dense", "launch_ms", 0.5),
                                  ("decode", "dense", "mem_r_sat", 0.03), ("decode", "dense", "r_sat", 0.05)]:
        want = getattr(truth.classes_[phase][cls], name)
        got = getattr(fitted.classes_[phase][cls], name)
        assert got == pytest.approx(want, abs=tol), (phase, cls, name)
    # r_sat and decay of a compute-bound class trade off against its coefficient; the shape they
    # give, the speedup from one SM count to another, is what the data pins down.
    for lo, hi in [(16, 64), (16, 120), (64, 120)]:
        speedup = [m.predict_part("prefill", "dense", 4096, 0, lo) / m.predict_part("prefill", "dense", 4096, 0, hi)
                   for m in (truth, fitted)]
        assert speedup[1] == pytest.approx(speedup[0], rel=0.03)


def test_heldout_error_is_scored_on_points_the_fit_never_saw(profile, fitted):
    train, held = split_samples(profile.samples)
    assert held and not {s.key for s in train} & {s.key for s in held}
    errors = fitted.errors(held)
    assert set(errors) == {"prefill", "decode", "contention"}
    assert sum(e["n"] for e in errors.values()) == sum(s.part == "all" for s in held)
    for group in errors.values():
        assert group["mape_pct"] < 6.0  # noise is 2%


def test_split_samples_refuses_a_heldout_point_also_trained_on():
    a = Sample("prefill", "all", 512, 0, 64, 10.0)
    b = Sample("prefill", "all", 512, 0, 64, 10.5, holdout=True)
    with pytest.raises(ValueError, match="held-out"):
        split_samples([a, b])


@pytest.mark.parametrize("unseen_sms", [{"prefill": {40, 88}, "decode": {44, 92}},
                                        {"prefill": {56, 104}, "decode": {28, 116}}])
def test_fit_of_measured_samples_predicts_sm_counts_it_never_saw(unseen_sms):
    """The tests above draw samples from the model's own form; these are an H100's measurements.
    Every sample at two SM counts per phase is held out (with the profiler's held-out points) and
    the fit on the rest must predict them as well as the README says profiles do (held-out error
    6.7% prefill, 1.2% decode), with margin."""
    measured = Profile.load(REPO / "profiles" / "h100-80gb-hbm3" / "llama-3.1-8b.json")
    held = [s for s in measured.samples if s.holdout or s.sms in unseen_sms[s.phase]]
    train = [s for s in measured.samples if not (s.holdout or s.sms in unseen_sms[s.phase])]
    model = measured.latency_model.fresh().fit(train)  # set up as the profile's (its heads: waves)
    errors = model.errors(held)
    limits = {"prefill": 10.0, "decode": 5.0, "contention": 5.0}  # MAPE %; the profiler's target is 10
    assert set(errors) == set(limits) and min(e["n"] for e in errors.values()) >= 2, errors
    assert all(errors[k]["mape_pct"] < limit for k, limit in limits.items()), errors


def test_one_disturbed_sample_does_not_bend_the_fit(profile, truth):
    train, held = split_samples(profile.samples)
    i = next(i for i, s in enumerate(train) if s.phase == "decode" and s.part == "all" and s.sms == 60)
    train[i] = Sample(**{**train[i].to_dict(), "ms": train[i].ms * 3})
    model = LatencyModel(TOTAL, profile.split_sms).fit(train)
    assert model.errors(held)["decode"]["mape_pct"] < 6.0


def test_saturation_points_follow_the_gpu_facts(truth, fitted):
    # Decode saturates near 48-64 SMs; a partition never gets prefill within 5% of the whole GPU.
    assert 48 <= truth.saturation_sms("decode", 64, 131072) <= 80
    assert abs(fitted.saturation_sms("decode", 64, 131072) - truth.saturation_sms("decode", 64, 131072)) <= 8
    assert fitted.saturation_sms("prefill", 2048, 0) == TOTAL
    assert fitted.saturation_sms("prefill", 2048, 0, within=0.5) < TOTAL
    assert fitted.saturation_sms("decode", 8, 16384) in fitted.sm_choices("decode")


def test_more_sms_never_slow_a_partition_down(fitted):
    for phase, size, kv in [("prefill", 512, 0), ("prefill", 4096, 8192), ("decode", 1, 512), ("decode", 256, 300000)]:
        ms = [fitted.predict(phase, size, kv, s) for s in fitted.sm_choices(phase)[:-1]]
        assert all(b <= a * 1.0001 for a, b in zip(ms, ms[1:])), (phase, size, kv)


def test_contention_slows_decode_more_for_heavier_prefill(fitted):
    alone = fitted.predict_decode(64, 131072, 68)
    light = fitted.predict_decode(64, 131072, 68, prefill_tokens=256, prefill_kv=0)
    heavy = fitted.predict_decode(64, 131072, 68, prefill_tokens=2048, prefill_kv=8192)
    assert alone < light and alone < heavy
    # Decode on every SM beside a prefill: the time-sharing convention, still a slowdown.
    assert fitted.predict_decode(64, 131072, TOTAL, prefill_tokens=2048) > fitted.predict_decode(64, 131072, TOTAL)


def test_a_prefill_stretches_compute_bound_decode_as_much_as_memory_bound(fitted):
    """Contention scales each class's whole GPU time past its fixed t0 (compute too: a large batch slowed
    more than a small one on the H200), so a 1-row and a 256-row batch stretch alike."""
    sms, prefill = 36, dict(prefill_tokens=2048, prefill_kv=8192)
    stretch = fitted._stretch(sms, **prefill)
    assert stretch > 1.05
    for batch, kv in [(1, 512), (256, 256 * 4096)]:
        for cls in ("attention", "dense"):
            t0 = fitted.classes_["decode"][cls].t0_ms
            alone = fitted._gpu_ms("decode", cls, batch, kv, sms) - t0
            beside = fitted._gpu_ms("decode", cls, batch, kv, sms, stretch) - t0
            assert beside / alone == pytest.approx(stretch, rel=1e-9), (batch, cls)


def test_a_decode_beside_stretches_prefill_by_its_share_of_the_sms(fitted):
    model = LatencyModel.from_dict(fitted.to_dict())
    alone = model.predict_prefill(2048, 0, 104)
    assert model.predict_prefill(2048, 0, 104, beside_decode=True) == alone  # uncalibrated: no stretch
    model.prefill_contention_ = 0.9
    beside = model.predict_prefill(2048, 0, 104, beside_decode=True)
    # The GPU time past each class's fixed t0 stretches by 1 + 0.9 x 28 / 132: the step nearly so.
    assert model.prefill_stretch(104) == pytest.approx(1 + 0.9 * 28 / TOTAL)
    assert beside / alone == pytest.approx(model.prefill_stretch(104), rel=0.02) and beside > alone
    assert model.prefill_stretch(112) < model.prefill_stretch(104)  # a smaller decode side slows it less
    again = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.predict_prefill(2048, 0, 104, beside_decode=True) == beside
    older = model.to_dict()
    del older["prefill_contention"]  # saved before calibrate fitted it
    assert LatencyModel.from_dict(older).predict_prefill(2048, 0, 104, beside_decode=True) == alone


def test_only_decode_fits_a_memory_exponent_below_the_knee(fitted):
    assert all(op.mem_low == 1.0 for op in fitted.classes_["prefill"].values())
    assert fitted.classes_["decode"]["dense"].mem_low >= 1.0


def _feed(model: LatencyModel, truth: LatencyModel, engine_ms, sms_choices, steps: int = 300, seed: int = 0) -> None:
    """Decode steps of random batches on `sms_choices`, observed as engine_ms(curve ms, batch)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch, sms = int(rng.integers(1, 129)), int(rng.choice(sms_choices))
        kv = batch * int(rng.integers(500, 4000))
        model.update("decode", batch, kv, sms, engine_ms(truth.predict_decode(batch, kv, sms), batch))


@pytest.mark.parametrize("engine_ms", [lambda ms, b: 1.5 * ms, lambda ms, b: 1.1 * ms + 0.15 * b + 3.0,
                                       lambda ms, b: 0.8 * ms])
def test_update_seen_on_one_sm_count_carries_to_every_sm_count(truth, engine_ms):
    """The engine runs decode on the few SM counts the controller picks; the correction it learns there
    must hold on the others, or the controller compares a corrected split with uncorrected ones."""
    model = LatencyModel.from_dict(truth.to_dict())
    _feed(model, truth, engine_ms, [60])
    for sms in model.sm_choices("decode"):
        for batch, ctx in [(1, 500), (16, 2000), (64, 1000), (128, 3000)]:
            want = engine_ms(truth.predict_decode(batch, batch * ctx, sms), batch)
            assert model.predict_decode(batch, batch * ctx, sms) == pytest.approx(want, rel=0.05), (sms, batch)
    assert model.predict_prefill(512, 0, 56) == truth.predict_prefill(512, 0, 56)  # the other phase: untouched


def test_update_follows_a_shift_and_shrugs_off_a_hiccup(truth):
    model = LatencyModel.from_dict(truth.to_dict())
    _feed(model, truth, lambda ms, b: 1.2 * ms, [36, 60, 92])
    settled = model.predict_decode(32, 65536, 68)
    assert settled == pytest.approx(1.2 * truth.predict_decode(32, 65536, 68), rel=0.03)
    model.update("decode", 32, 65536, 68, 50 * settled)  # a GC pause
    assert model.predict_decode(32, 65536, 68) < 1.15 * settled
    _feed(model, truth, lambda ms, b: ms, [36, 60, 92], seed=1)  # the GPU is back to its profile
    assert model.predict_decode(32, 65536, 68) == pytest.approx(truth.predict_decode(32, 65536, 68), rel=0.03)


def test_update_returns_the_prediction_and_a_step_as_predicted_changes_nothing(truth):
    model = LatencyModel.from_dict(truth.to_dict())
    contended = model.predict_decode(64, 131072, 68, 2048, 0)
    assert model.update("decode", 64, 131072, 68, contended, prefill_tokens=2048) == contended
    assert model.corrections_["decode"].coef_ == pytest.approx((1.0, 0.0, 0.0), abs=1e-9)
    assert model.predict_decode(64, 131072, 68, 2048, 0) == pytest.approx(contended)


def test_profiles_with_per_bucket_factors_load_without_them(truth):
    old = truth.to_dict() | {"update_rate": 0.1, "bucket_sms": 16, "corrections": {"prefill": {}, "decode": {"64": 1.4}}}
    model = LatencyModel.from_dict(old)
    assert model.predict_decode(8, 8192, 68) == truth.predict_decode(8, 8192, 68)


def test_models_saved_before_waves_load_and_predict_as_then(truth):
    old = truth.to_dict()
    del old["attention_heads"]
    for classes in old["classes"].values():
        for op in classes.values():
            del op["wave_programs"]
    model = LatencyModel.from_dict(json.loads(json.dumps(old)))
    assert model.attention_heads is None and model.fresh().attention_heads is None
    for point in [("prefill", 512, 8192, 72), ("prefill", 2048, 0, TOTAL), ("decode", 8, 8192, 68)]:
        assert model.predict(*point) == truth.predict(*point)


def test_models_saved_before_mem_low_and_mem_whole_load_and_predict_as_then(truth):
    old = truth.to_dict()
    for classes in old["classes"].values():
        for op in classes.values():
            del op["mem_low"], op["mem_whole"]
    model = LatencyModel.from_dict(json.loads(json.dumps(old)))
    assert all(op.mem_low == 1.0 and op.mem_whole == op.whole
               for classes in model.classes_.values() for op in classes.values())
    for point in [("prefill", 512, 8192, 72), ("decode", 8, 8192, 20), ("decode", 64, 131072, TOTAL)]:
        assert model.predict(*point) == truth.predict(*point)


def test_memory_bound_decode_slower_than_one_over_sms_on_few_sms_is_fitted():
    """A GPU whose decode layers read weights slower per SM on few SMs (share ~ r^1.5 below the knee):
    the fit finds the exponent and predicts the smallest decode side, where 1/r would be 21-27% short."""
    truth = synthetic_latency_model(TOTAL, 8)
    dense = truth.classes_["decode"]["dense"]
    truth.classes_["decode"]["dense"] = replace(dense, mem_low=1.5)
    profile = synthetic_profile(TOTAL, 8, noise=0.0, quick=False)
    samples = [replace(s, ms=truth.sample_ms(s)) for s in profile.samples]
    fitted = LatencyModel(TOTAL, profile.split_sms).fit(samples)
    assert fitted.classes_["decode"]["dense"].mem_low > 1.2
    smallest = min(fitted.sm_choices("decode"))
    for batch, kv in [(1, 2048), (16, 32768)]:
        assert fitted.predict("decode", batch, kv, smallest) == pytest.approx(
            truth.predict("decode", batch, kv, smallest), rel=0.05)


def test_a_whole_gpu_that_gains_more_on_compute_than_on_memory_is_fitted():
    """Decode on the whole GPU: large batches (compute-bound) 35% quicker than the partition curve says,
    small ones (memory-bound) 5%; one factor for both misses one of them, two fit both."""
    truth = synthetic_latency_model(TOTAL, 8)
    dense = truth.classes_["decode"]["dense"]
    truth.classes_["decode"]["dense"] = replace(dense, whole=0.65, mem_whole=0.95)
    profile = synthetic_profile(TOTAL, 8, noise=0.0, quick=False)
    samples = [replace(s, ms=truth.sample_ms(s)) for s in profile.samples]
    fitted = LatencyModel(TOTAL, profile.split_sms).fit(samples)
    for batch, kv in [(1, 2048), (256, 131072)]:
        assert fitted.predict("decode", batch, kv, TOTAL) == pytest.approx(truth.predict("decode", batch, kv, TOTAL),
                                                                          rel=0.05)


def test_waves_quantize_the_prefix_share_of_prefill_attention():
    """32 heads, two programs resident per SM: 16 programs per 64-token tile per SM. A 512-token chunk
    (256 programs) takes two waves on 72 to 112 SMs and one on 132; over no prefix it does not quantize."""
    op = OpClass([1.0, 0.0], 1.0, 1.0, [1e-9], 1.0, 1.0, 0.0, 0.0, 1.0, wave_programs=16.0)
    per_sm = [op.waves(512, 1_000_000, s) / s for s in (72, 88, 104, 112)]  # compute time ~ waves / SMs
    assert max(per_sm) == pytest.approx(min(per_sm), rel=0.01)
    assert op.waves(512, 1_000_000, 132) / 132 == pytest.approx(per_sm[0] / 2, rel=0.02)
    assert op.waves(512, 0, 72) == 1.0 and replace(op, wave_programs=0.0).waves(512, 8192, 72) == 1.0
    assert op.waves(8192, 0, 100) == 1.0 and 1.0 < op.waves(512, 8192, 100) < 2.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_update_rejects_meaningless_observations(truth, bad):
    model = LatencyModel.from_dict(truth.to_dict())
    with pytest.raises(ValueError, match="observed_ms"):
        model.update("prefill", 512, 0, 64, bad)


def test_round_trip_through_plain_json(fitted):
    fitted_copy = LatencyModel.from_dict(json.loads(json.dumps(fitted.to_dict())))
    fitted_copy.update("prefill", 2048, 0, 64, 100.0)
    again = LatencyModel.from_dict(json.loads(json.dumps(fitted_copy.to_dict())))
    for phase, size, kv, sms in [("prefill", 2048, 0, 64), ("decode", 8, 4096, 20), ("prefill", 300, 100, TOTAL)]:
        assert again.predict(phase, size, kv, sms) == fitted_copy.predict(phase, size, kv, sms)
    assert again.predict_decode(64, 131072, 68, 2048, 0) == fitted_copy.predict_decode(64, 131072, 68, 2048, 0)
    assert isinstance(again.classes_["decode"]["attention"], OpClass)


def test_misuse_is_a_clear_error(fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        LatencyModel(TOTAL).predict_prefill(512, 0, 64)
    with pytest.raises(ValueError, match="sms"):
        fitted.predict_prefill(512, 0, TOTAL + 1)
    with pytest.raises(ValueError, match="size >= 1"):
        fitted.predict_decode(0, 0, 64)
    with pytest.raises(ValueError, match="phase"):
        fitted.saturation_sms("train", 1, 1)
    with pytest.raises(ValueError, match="phase"):
        Sample("train", "all", 1, 0, 8, 1.0)
    with pytest.raises(ValueError, match="no decode samples"):
        LatencyModel(TOTAL).fit([Sample("prefill", "all", 512, 0, 64, 10.0)])
    with pytest.raises(ValueError, match="split_sms"):
        LatencyModel(TOTAL, split_sms=[0, 64])


def test_share_curve_has_two_regimes():
    r = np.linspace(0.01, 1.0, 100)
    s = share(r, 0.3, 4.0, np)
    assert np.allclose(s[r <= 0.3], r[r <= 0.3])  # linear: time ~ c / (r C)
    gains = np.diff(s[r > 0.3])
    assert np.all(gains > 0) and np.all(np.diff(gains) < 0)  # diminishing returns
    assert s[-1] < 0.3 + 1 / 4.0
    assert share(0.5, 0.3, 4.0) == pytest.approx(float(share(np.array(0.5), 0.3, 4.0, np)))
    steeper = share(r, 0.3, 4.0, np, low=1.5)
    assert np.allclose(steeper[r >= 0.3], s[r >= 0.3])  # the same above the knee
    assert np.all(steeper[r < 0.3] < s[r < 0.3])  # below it, a smaller share: slower than 1/r
