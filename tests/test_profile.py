"""Profile files: round trip, every refusal with the command that makes the right file,
synthetic profiles kept out of profiles/, and `nexus-tune profile show`."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from nexus_tune.commands.cli import main
from nexus_tune.core.crossval import meets_targets
from nexus_tune.core.device import DeviceInfo
from nexus_tune.core.grid import split_samples
from nexus_tune.core.overhead import StepOverhead
from nexus_tune.core.profile import REPO_PROFILES, SCHEMA_VERSION, Profile, ProfileError, model_slug, profile_path
from nexus_tune.core.testing import synthetic_profile

MAKE = "nexus-tune profile --model llama-3.1-8b"


@pytest.fixture(scope="module")
def synthetic() -> Profile:
    return synthetic_profile(132, 8, config_hash="abc123")


@pytest.fixture
def saved(synthetic, tmp_path) -> Path:
    return synthetic.save(profile_path(synthetic.gpu["slug"], "llama-3.1-8b", tmp_path / "profiles"))


def _device(synthetic: Profile, **changes) -> DeviceInfo:
    return DeviceInfo.from_dict({**synthetic.gpu, **changes})


def _rewrite(path: Path, edit) -> Path:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


def test_save_load_round_trip(synthetic, saved):
    assert saved.name == "llama-3.1-8b.json" and saved.parent.name == synthetic.gpu["slug"]
    loaded = Profile.load(saved, expect_gpu=_device(synthetic), expect_model_hash="abc123")
    assert loaded.to_dict() == json.loads(json.dumps(synthetic.to_dict()))
    assert loaded.samples == synthetic.samples
    for point in [("prefill", 2048, 0, 64), ("decode", 64, 131072, 68), ("decode", 1, 100, 132)]:
        assert loaded.latency_model.predict(*point) == synthetic.latency_model.predict(*point)
    assert not list(saved.parent.glob("*.tmp"))  # the atomic write left nothing behind


def test_tuned_knobs_survive_a_round_trip(synthetic, tmp_path):
    knobs = {"mode": "slo", "alpha": 1.2, "tbt_ms": 40.0}
    path = tmp_path / "p.json"
    Profile(**{**synthetic.__dict__, "tuned_knobs": knobs}).save(path)
    assert Profile.load(path).tuned_knobs == knobs


def test_the_profile_carries_what_other_parts_read(synthetic, saved):
    raw = json.loads(saved.read_text())
    assert raw["synthetic"] is True and raw["schema_version"] == SCHEMA_VERSION
    for key in ("gpu", "software", "model", "granularity", "split_sms", "kv_capacity_tokens", "samples",
                "latency_model", "fit_error", "created", "tuned_knobs", "grid"):
        assert key in raw
    assert raw["split_sms"] == list(range(8, 121, 8))
    assert raw["gpu"]["sm_count"] == 132 and raw["model"]["config_hash"] == "abc123"
    assert set(raw["fit_error"]) == {"prefill", "decode", "contention"}


def test_synthetic_profile_reproduces_gpu_facts(synthetic):
    m = synthetic.latency_model
    for sms, want in [(16, 314), (64, 88), (112, 64), (128, 57), (132, 46.5)]:
        assert m.predict_prefill(2048, 0, sms) == pytest.approx(want, rel=0.08)
    for sms, want in [(16, 28.8), (32, 15.9), (64, 12.5), (132, 12.0)]:
        assert m.predict_decode(64, 131072, sms) == pytest.approx(want, rel=0.08)
    slowdown = m.predict_decode(64, 131072, 68, 2048, 0) / m.predict_decode(64, 131072, 68)
    assert 1.15 < slowdown < 1.5  # docs/gpu-facts.md: about +30% beside a prefill


def test_synthetic_profile_scales_and_fits_other_gpus():
    small = synthetic_profile(total_sms=40, granularity=8, scale=0.4, noise=0.0)
    assert small.split_sms == [8, 16, 24, 32] and small.latency_model.total_sms == 40
    big = synthetic_profile(total_sms=40, granularity=8, noise=0.0)
    assert small.latency_model.predict_prefill(1024, 0, 16) == pytest.approx(
        0.4 * big.latency_model.predict_prefill(1024, 0, 16))
    assert small.fit_error["decode"]["mape_pct"] == pytest.approx(0.0, abs=1e-9)


def test_synthetic_profile_is_never_written_under_profiles(synthetic):
    target = REPO_PROFILES / "synthetic-132sm" / "llama-3.1-8b.json"
    with pytest.raises(ProfileError, match="synthetic"):
        synthetic.save(target)
    assert not target.exists()


def test_refuses_another_gpu(synthetic, saved):
    with pytest.raises(ProfileError, match="not on this NVIDIA A100") as e:
        Profile.load(saved, expect_gpu=_device(synthetic, name="NVIDIA A100", slug="a100-sxm4-80gb", sm_count=108))
    assert MAKE in str(e.value)


def test_refuses_another_model(saved):
    with pytest.raises(ProfileError, match="not for this model") as e:
        Profile.load(saved, expect_model_hash="ffff0000")
    assert "nexus-tune profile --model" in str(e.value)


def test_refuses_a_newer_schema(saved):
    _rewrite(saved, lambda raw: raw.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ProfileError, match="newer") as e:
        Profile.load(saved)
    assert "upgrade nexus-tune" in str(e.value) and MAKE in str(e.value)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),  # truncated
    lambda p: p.write_bytes(b"\xff\xfe\x00garbage"),  # not text
    lambda p: p.write_text("[1, 2, 3]"),  # not an object
    lambda p: _rewrite(p, lambda raw: raw.pop("schema_version")),
    lambda p: _rewrite(p, lambda raw: raw.pop("latency_model")),
    lambda p: _rewrite(p, lambda raw: raw["gpu"].pop("slug")),
    lambda p: _rewrite(p, lambda raw: raw.update(samples=[{"phase": "prefill"}])),
    lambda p: _rewrite(p, lambda raw: raw["latency_model"]["classes"].pop("decode")),
    lambda p: _rewrite(p, lambda raw: raw.update(split_sms="all")),
    lambda p: _rewrite(p, lambda raw: raw.update(model="llama")),
    lambda p: _rewrite(p, lambda raw: raw["gpu"].update(sm_count="132")),
])
def test_refuses_a_corrupt_file(saved, damage):
    damage(saved)
    with pytest.raises(ProfileError) as e:
        Profile.load(saved)
    assert "nexus-tune profile --model llama-3.1-8b" in str(e.value)
    assert "remake" in str(e.value)


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no profile at") as e:
        Profile.load(tmp_path / "h100-80gb-hbm3" / "qwen2.5-3b.json")
    assert f"nexus-tune profile --model qwen2.5-3b --out {tmp_path}" in str(e.value)


def test_paths_and_slugs():
    assert model_slug("llama-3.1-8b") == "llama-3.1-8b"
    assert model_slug("/models/Meta-Llama-3.1-8B-Instruct/") == "meta-llama-3.1-8b-instruct"
    assert profile_path("h100-80gb-hbm3", "Qwen2.5-3B") == Path("profiles/h100-80gb-hbm3/qwen2.5-3b.json")


def test_show_prints_tables_and_writes_a_png(saved, tmp_path, capsys):
    png = tmp_path / "plots" / "curves.png"
    assert main(["profile", "show", str(saved), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for text in ("SYNTHETIC", "Fit error on held-out points", "Saturation", "Operator classes", "wrote"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_refuses_a_bad_file_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["profile", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable profile" in err and "nexus-tune profile --model bad" in err


@pytest.fixture(scope="module")
def calibrated(synthetic) -> Profile:
    """The synthetic profile as a user's would be after `tune` and `calibrate`."""
    overhead = StepOverhead({"decode/decode": (1.1, 0.5, 0.02)}, {"decode/decode": {"steps": 40}})
    return replace(synthetic, tuned_knobs={"mode": "slo", "alpha": 1.2}, step_overhead=overhead)


def test_refit_keeps_everything_but_the_model_and_its_errors(calibrated, tmp_path):
    refitted = calibrated.refit(attention_heads=32, folds=2)
    kept = ("gpu", "model", "granularity", "split_sms", "kv_capacity_tokens", "samples", "grid", "created",
            "tuned_knobs", "step_overhead", "software", "backend", "synthetic")
    assert all(getattr(refitted, k) == getattr(calibrated, k) for k in kept)
    assert refitted.latency_model is not calibrated.latency_model and refitted.latency_model.attention_heads == 32
    assert refitted.refitted and calibrated.refitted is None
    _, held = split_samples(calibrated.samples)
    assert refitted.fit_error == refitted.latency_model.errors(held)
    cv = refitted.cross_validation
    assert (cv["folds"], cv["seed"]) == (2, 0) and set(cv["groups"]) == {"prefill", "decode", "contention"}
    path = refitted.save(tmp_path / "refitted.json")
    again = Profile.load(path)
    assert again.to_dict() == json.loads(json.dumps(refitted.to_dict()))
    assert again.latency_model.predict_prefill(512, 8192, 72) == refitted.latency_model.predict_prefill(512, 8192, 72)


def test_profiles_from_before_cross_validation_load(saved):
    _rewrite(saved, lambda raw: [raw.pop(k) for k in ("cross_validation", "refitted")])
    loaded = Profile.load(saved)
    assert loaded.cross_validation is None and loaded.refitted is None


def test_check_and_refit_commands_need_no_gpu(calibrated, tmp_path, capsys):
    path = calibrated.save(tmp_path / "p.json")
    out = tmp_path / "refitted.json"
    assert main(["profile", "refit", str(path), "--folds", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before -> after" in text and "step_overhead kept" in text and f"wrote {out}" in text.replace("\n", "")
    refitted = Profile.load(out)
    assert refitted.latency_model.attention_heads == 32  # llama-3.1-8b's, from the engine's preset
    assert refitted.step_overhead == calibrated.step_overhead and refitted.tuned_knobs == calibrated.tuned_knobs
    assert main(["profile", "show", str(out)]) == 0 and "Cross-validated error" in capsys.readouterr().out
    # check cross-validates as the refit did (same model set-up, folds and seed): exit 1 when a group misses
    assert main(["profile", "check", str(out), "--folds", "2"]) == (0 if meets_targets(refitted.cross_validation) else 1)
    assert "cross-validated error (2-fold" in capsys.readouterr().out
    assert main(["profile", "check", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit):  # one fold trains on nothing: refused while parsing
        main(["profile", "check", str(path), "--folds", "1"])


def test_samples_of_another_sweep_join_a_refit(synthetic, tmp_path, capsys):
    half = len(synthetic.samples) // 2
    first = replace(synthetic, samples=synthetic.samples[:half], created="sweep 1")
    held = next(s for s in synthetic.samples[half:] if s.holdout)
    # the second sweep trained on a point the first held out (a user's two sweeps drew their points apart)
    second = replace(synthetic, samples=[*synthetic.samples[half:], replace(held, holdout=False, ms=held.ms * 1.01)],
                     created="sweep 2")
    pooled = first.with_samples_of([second])
    assert len(pooled.samples) == len(synthetic.samples) + 1
    assert not any(s.holdout for s in pooled.samples if s.key == held.key)  # trained somewhere: trained on
    assert pooled.grid["samples_from"] == ["sweep 1", "sweep 2"]
    split_samples(pooled.samples)  # no held-out point was trained on

    a, b = first.save(tmp_path / "a.json"), second.save(tmp_path / "b.json")
    out = tmp_path / "pooled.json"
    assert main(["profile", "refit", str(a), "--add-samples", str(b), "--folds", "2", "--out", str(out)]) == 0
    assert f"{len(pooled.samples)} samples" in capsys.readouterr().out
    assert len(Profile.load(out).samples) == len(pooled.samples)

    other_model = replace(second, model={**second.model, "name": "qwen2.5-3b", "config_hash": "def456"})
    with pytest.raises(ProfileError, match="same GPU, model and backend only"):
        first.with_samples_of([other_model])
    assert main(["profile", "refit", str(a), "--add-samples", str(other_model.save(tmp_path / "q.json"))]) == 2
    assert "cannot join" in capsys.readouterr().err
