from dataclasses import replace
from pathlib import Path

import pytest

from nexus_tune.commands.cli import main
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.simulator import simulate
from nexus_tune.commands.tune import CapacityProbe, find_capacity, rate_range, search_capacity, tune
from nexus_tune.core.workload import make_trace

SLOS = {"ttft": 3000.0, "tpot": 50.0}
NUM_PROMPTS = 100  # small traces: these tests check the search, not the numbers


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


class Step:
    """A monotone fake: everything passes up to `threshold` req/s, nothing above; counts calls."""

    def __init__(self, threshold):
        self.threshold, self.calls = threshold, 0

    def __call__(self, rate):
        self.calls += 1
        return 1.0 if rate <= self.threshold else 0.5


@pytest.mark.parametrize("start", [0.05, 3.7, 100.0])
def test_capacity_search_finds_threshold(start):
    fake = Step(3.7)
    cap, tried = find_capacity(fake, start, rel_tol=0.02, max_evals=30)
    assert 3.7 / 1.02 <= cap <= 3.7
    assert fake.calls == len(tried) < 30


def test_capacity_search_on_smooth_attainment():
    # attainment 1 / (1 + (rate/5)^4) crosses 0.9 at 5 * (1/9)^(1/4)
    cap, _ = find_capacity(lambda r: 1 / (1 + (r / 5) ** 4), 1.0, rel_tol=0.01, max_evals=30)
    assert cap == pytest.approx(5 * (1 / 9) ** 0.25, rel=0.011)


def test_capacity_search_is_bounded():
    fake = Step(3.7)
    find_capacity(fake, 1.0, max_evals=4)
    assert fake.calls == 4
    never = Step(-1.0)
    assert find_capacity(never, 8.0, max_evals=50, min_rate=1.0)[0] == 0.0
    assert never.calls == 4  # 8, 4, 2, 1: then below min_rate
    assert find_capacity(Step(1e9), 1.0, max_rate=10.0)[0] == 10.0
    with pytest.raises(ValueError):
        find_capacity(fake, 0.0)


def test_simulated_capacity_brackets_the_slo(profile):
    start, ceiling = rate_range(profile, "mixed", NUM_PROMPTS, 0)
    probe = CapacityProbe(profile, "mixed", NUM_PROMPTS, 0, SLOS)
    cap, summaries = search_capacity(probe, start, max_rate=ceiling)
    assert start / 4 < cap < ceiling
    assert summaries[cap]["slo_attainment"] >= 0.9
    assert all(s["slo_attainment"] < 0.9 for r, s in summaries.items() if r > cap * 1.05)


def test_tuning_improves_on_bad_knobs_in_the_profile(profile):
    """Knobs that starve prefill on this profile (the paper's beta=1.1 against the whole GPU's
    largest side): tune starts from them and finds far better ones."""
    bad, n = ControllerKnobs(mode="paper", beta=1.1), 60
    start, ceiling = rate_range(profile, "mixed", n, 0)
    out = tune(replace(profile, tuned_knobs=bad.to_dict()), "mixed", SLOS, trials=4, seed=0, num_prompts=n, workers=2)
    assert out["baseline_knobs"] == bad.with_slos(SLOS) and out["trials"] == 4
    baseline = search_capacity(CapacityProbe(profile, "mixed", n, 0, SLOS, "nexus", bad), start, max_evals=12,
                               max_rate=ceiling)[0]
    assert out["baseline_capacity"] == pytest.approx(baseline)
    assert out["best_capacity"] > 1.2 * out["baseline_capacity"]


@pytest.mark.parametrize("gpu", [dict(total_sms=132, granularity=8),
                                 dict(total_sms=108, granularity=4, scale=1.6, kv_capacity_tokens=250_000)],
                         ids=["H100-like", "slower, 108 SMs"])
def test_untuned_nexus_carries_within_10pct_of_tuned(gpu):
    """Without tuned knobs nexus runs with knobs derived from the profile and the SLOs; a tune run
    (started from them) must not find much more. benchmarks/capacity.py measures it at full size."""
    gpu_profile = synthetic_profile(**gpu)
    out = tune(gpu_profile, "mixed", SLOS, trials=5, seed=0, num_prompts=80, workers=2)
    assert out["baseline_knobs"] == ControllerKnobs.for_profile(gpu_profile, SLOS)
    assert out["baseline_capacity"] >= 0.9 * out["best_capacity"] > 0


def test_tune_cli_writes_knobs_into_profile(profile, tmp_path, capsys):
    path = tmp_path / "p.json"
    profile.save(path)
    argv = ["tune", "--profile", str(path), "--workload", "sharegpt-synth", "--slo", "ttft=2000,tpot=40",
            "--trials", "3", "--num-prompts", "60"]
    assert main(argv) == 0
    saved = Profile.load(path)
    knobs = ControllerKnobs.from_dict(saved.tuned_knobs)
    assert knobs.ttft_ms == 2000 and knobs.tbt_ms == 40
    # the simulator (like the engine) now runs with them by default
    trace = make_trace("sharegpt-synth", 5, 1.0)
    assert simulate(saved, trace, "nexus").summary()["completed"] == 5
    assert "Tuned knobs written" in capsys.readouterr().out


def test_tune_cli_bad_input(tmp_path, capsys):
    assert main(["tune", "--profile", str(tmp_path / "missing.json")]) == 2  # more bad input: test_cli_errors.py
    err = capsys.readouterr().err
    assert "nexus-tune profile --model" in err and "Traceback" not in err


@pytest.mark.parametrize("name, workload, slos", [("llama-3.1-8b", "mixed", SLOS),
                                                  ("qwen2.5-3b", "longdata", {"ttft": 3000.0, "tpot": 30.0})])
def test_untuned_nexus_on_the_shipped_h100_profiles_carries_within_10pct_of_their_tuned_knobs(name, workload, slos):
    profile = Profile.load(Path(__file__).resolve().parents[1] / "profiles" / "h100-80gb-hbm3" / f"{name}.json")
    untuned = ControllerKnobs.for_profile(replace(profile, tuned_knobs=None), slos)
    start, ceiling = rate_range(profile, workload, 150, 0)
    untuned_cap, tuned_cap = (search_capacity(CapacityProbe(profile, workload, 150, 0, slos, "nexus", knobs), start,
                                              max_evals=8, max_rate=ceiling)[0]
                              for knobs in (untuned, ControllerKnobs.for_profile(profile, slos)))
    assert untuned_cap >= 0.9 * tuned_cap > 0
