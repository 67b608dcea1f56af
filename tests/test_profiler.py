"""The fixed grids (synthetic profiles sample them; the adaptive sweep is checked against the full
one in tests/test_grid_adaptive.py), the roofline estimate, and the command's behaviour without a
GPU. The sweep itself runs only on a GPU (last test)."""
import subprocess
import sys

import pytest
import torch

from nexus_tune.engine.config import get_preset
from nexus_tune.commands.cli import main
from nexus_tune.core.latency_model import PARTS
from nexus_tune.core.partition import Granularity, split_sizes
from nexus_tune.core.testing import synthetic_latency_model
from nexus_tune.core.grid import PILOT_DECODE, PILOT_PREFILL, Plan, RooflineCost, plan_grid, split_samples

H100_SPLITS = split_sizes(Granularity(132, 8, 8))
H100_KV = 430_000  # Llama-3.1-8B at 0.9 memory utilisation on 80 GB


@pytest.fixture(scope="module")
def cost() -> RooflineCost:
    return RooflineCost.of_config(get_preset("llama-3.1-8b"), 132)


@pytest.fixture(scope="module", params=[False, True], ids=["full", "quick"])
def plan(request, cost) -> Plan:
    return plan_grid(H100_SPLITS, 132, H100_KV, request.param, cost)


def test_grid_covers_every_phase_part_and_the_whole_gpu(plan):
    solo = [p for p in plan.points if not p.prefill_tokens and not p.holdout]
    for phase, side in [("prefill", H100_SPLITS), ("decode", [132 - s for s in H100_SPLITS])]:
        sms = {p.sms for p in solo if p.phase == phase}
        assert 132 in sms and sms - {132} <= set(side)
        assert len(sms) == (6 if plan.name == "quick" else 12)
        sizes = {p.size for p in solo if p.phase == phase}
        assert min(sizes) <= (256 if phase == "prefill" else 1) and max(sizes) >= (4096 if phase == "prefill" else 256)
        assert {p.part for p in solo if p.phase == phase} == set(PARTS)
    assert any(p.prefill_tokens and not p.holdout for p in plan.points)


def test_heldout_points_are_unseen_configurations(plan):
    train = [p for p in plan.points if not p.holdout]
    held = [p for p in plan.points if p.holdout]
    assert held and not {p.sample(1.0).key for p in train} & {p.sample(1.0).key for p in held}
    for phase in ("prefill", "decode"):
        train_sms = {p.sms for p in train if p.phase == phase and not p.prefill_tokens}
        held_sms = {p.sms for p in held if p.phase == phase and not p.prefill_tokens}
        assert held_sms and not held_sms & train_sms  # SM counts the fit never sees
    assert any(p.prefill_tokens for p in held)


def test_every_point_fits_the_kv_cache_and_the_run_cap(plan):
    cap = 400.0 if plan.name == "quick" else 1000.0
    assert plan.dropped > 0  # 8192-token prefills on 8 SMs are not worth their time
    for p, ms in zip(plan.points, plan.run_ms):
        assert ms <= cap
        assert p.kv + p.size + p.prefill_kv + p.prefill_tokens <= H100_KV
        if p.phase == "decode":
            assert p.kv >= p.size
        if p.prefill_tokens:
            assert 132 - p.sms in H100_SPLITS  # the prefill runs on the complementary side of a split


def test_slow_host_overheads_thin_the_sm_counts_to_fit_the_budget(cost):
    wide = plan_grid(H100_SPLITS, 132, H100_KV, True, cost, capture_s=0.5)
    thin = plan_grid(H100_SPLITS, 132, H100_KV, True, cost, capture_s=0.5, budget_s=90.0)
    assert wide.seconds() > 90.0 >= thin.seconds()
    assert 4 <= len(thin.describe()["prefill_sms"]) < len(wide.describe()["prefill_sms"])
    floor = plan_grid(H100_SPLITS, 132, H100_KV, True, cost, capture_s=0.5, budget_s=1.0)
    assert floor.describe()["prefill_sms"] == [8, 64, 120, 132]  # the thinnest grid, over budget


def test_small_gpu_holds_out_sizes_instead_of_sm_counts():
    splits = split_sizes(Granularity(40, 8, 8))  # 8, 16, 24, 32
    plan = plan_grid(splits, 40, 100_000, False, synthetic_latency_model(40, 8).predict_part)
    train = {p.sample(1.0).key for p in plan.points if not p.holdout}
    held = [p for p in plan.points if p.holdout]
    assert held and not train & {p.sample(1.0).key for p in held}


def test_points_longer_than_the_model_context_are_left_out(cost):
    plan = plan_grid(H100_SPLITS, 132, H100_KV, True, cost, max_seq_len=2048)
    assert plan.points and plan.dropped > plan_grid(H100_SPLITS, 132, H100_KV, True, cost).dropped
    for p in plan.points:
        assert (p.kv + p.size if p.phase == "prefill" else -(-p.kv // p.size) + 1) <= 2048
        assert p.prefill_kv + p.prefill_tokens <= 2048


def test_roofline_estimate_calibrates_to_the_pilot(cost):
    # Uncalibrated, the H100 rates land near the whole-model numbers of docs/gpu-facts.md.
    assert 30 < cost("prefill", "all", 2048, 0, 132) < 70  # measured 46.5 ms
    assert 8 < cost("decode", "all", 64, 131072, 132) < 16  # measured 12.0 ms
    assert cost("prefill", "all", 2048, 0, 16) > 5 * cost("prefill", "all", 2048, 0, 132)
    slower = cost.calibrated(prefill_ms=100.0, decode_ms=20.0)
    assert slower("prefill", "all", *PILOT_PREFILL, 132) == pytest.approx(100.0, rel=0.02)
    assert slower("decode", "all", *PILOT_DECODE, 132) == pytest.approx(20.0, rel=0.02)
    assert cost("prefill", "attention", 2048, 8192, 64) < cost("prefill", "all", 2048, 8192, 64)


def test_importing_the_profiler_loads_neither_engine_nor_torch():
    code = ("import sys, nexus_tune.commands.profiler, nexus_tune.core.profile; "
            "print('nexus_tune.engine' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_profile_needs_a_model(capsys):
    assert main(["profile"]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_profile_without_a_gpu_exits_with_a_clear_message(tmp_path, capsys):
    assert main(["profile", "--model", "tiny", "--quick", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "GPU" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times real model steps on a GPU")
def test_quick_profile_of_a_small_model_on_a_gpu(tmp_path, capsys):
    from nexus_tune.core.device import identify
    from nexus_tune.core.profile import Profile, profile_path

    model = "qwen2.5-0.5b"  # real shapes, under a minute of sweep
    assert main(["profile", "--model", model, "--quick", "--out", str(tmp_path)]) == 0
    gpu = identify()
    profile = Profile.load(profile_path(gpu.slug, model, tmp_path), expect_gpu=gpu,
                           expect_model_hash=get_preset(model).config_hash())
    assert not profile.synthetic and profile.kv_capacity_tokens > 0
    measured = {(s.phase, s.part) for s in profile.samples}
    assert measured == {(phase, part) for phase in ("prefill", "decode") for part in PARTS}
    assert any(s.prefill_tokens for s in profile.samples)
    # fit_error is the saved model's error on the held-out samples, and that error is small: twice the
    # profiler's 10% target at most, on the quick grid of a small (launch-bound) model.
    _, held = split_samples(profile.samples)  # also refuses a held-out point that was trained on
    recomputed = profile.latency_model.errors(held)
    assert set(profile.fit_error) == set(recomputed) == {"prefill", "decode", "contention"}
    for phase, e in profile.fit_error.items():
        assert e == pytest.approx(recomputed[phase]), phase
        assert e["n"] >= 1 and e["mape_pct"] < 20.0, (phase, e)
    assert all("time budget ran out" in s for s in profile.grid["skipped"])  # every point timed, or cut at the end
    # and cross-validated over every point, with the model's heads (prefill attention's waves)
    assert set(profile.cross_validation["groups"]) == {"prefill", "decode", "contention"}
    assert profile.latency_model.attention_heads == get_preset(model).num_attention_heads
    out = capsys.readouterr().out
    assert "Saturation" in out and "Cross-validated error" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times real model steps on a GPU")
def test_from_rescales_a_profile_of_the_model_on_a_gpu(tmp_path, capsys):
    from nexus_tune.core.device import identify
    from nexus_tune.core.profile import Profile, profile_path
    from nexus_tune.core.testing import synthetic_profile

    model = "qwen2.5-0.5b"  # the prior: an H100-like synthetic profile of it, far off this GPU
    prior = synthetic_profile(model_name=model, config_hash=get_preset(model).config_hash(), scale=0.2)
    path = prior.save(tmp_path / "other-gpu.json")
    assert main(["profile", "--model", model, "--from", str(path), "--out", str(tmp_path)]) == 0
    profile = Profile.load(profile_path(identify().slug, model, tmp_path))
    assert profile.grid["name"] == "from" and profile.grid["from"]["kept"] in ("rescaled", "fresh")
    assert set(profile.grid["from"]["prior_error"]) == set(profile.fit_error) == {"prefill", "decode", "contention"}
    assert all("time budget ran out" in s for s in profile.grid["skipped"])
    assert "mispredicts the new points" in capsys.readouterr().out


def test_usable_splits_keep_two_minimum_partitions_on_the_remainder_side():
    from nexus_tune.commands.profiler import usable_splits

    splits = list(range(8, 121, 8))
    assert usable_splits(splits, 132, 8) == list(range(8, 113, 8))  # 120 would leave decode 12 SMs
    assert usable_splits([2, 4, 74, 76], 78, 2) == [2, 4, 74]
