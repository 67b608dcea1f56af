import pytest

from nexus_tune.commands.cli import main
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.commands.plan import POLICIES, plan, static_policies, statics_beside
from nexus_tune.core.testing import synthetic_profile

SLOS = {"ttft": 3000.0, "tpot": 50.0}


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def test_static_candidates_are_precreated_splits(profile):
    statics = static_policies(profile)
    assert 3 <= len(statics) <= 5
    assert all(int(p.split(":")[1]) in profile.split_sms for p in statics)


def test_statics_beside_are_the_untried_neighbour_splits(profile):
    splits = sorted(profile.split_sms)
    middle = f"static:{splits[3]}"
    assert statics_beside(profile, middle, [middle]) == [f"static:{splits[2]}", f"static:{splits[4]}"]
    assert statics_beside(profile, middle, [middle, f"static:{splits[4]}"]) == [f"static:{splits[2]}"]
    assert statics_beside(profile, f"static:{splits[-1]}", []) == [f"static:{splits[-2]}"]


def test_plan_reports_every_policy(profile):
    result = plan(profile, "mixed", SLOS, num_prompts=60, workers=2)
    assert result["policies"] == [*POLICIES, result["best_static"]]
    statics = static_policies(profile)
    best_candidate = max(statics, key=lambda p: result["capacity"][p])
    tried = [*statics, *statics_beside(profile, best_candidate, statics)]
    assert set(tried) < set(result["capacity"]) | set(POLICIES) and len(tried) > len(statics)
    assert result["capacity"][result["best_static"]] == max(result["capacity"][p] for p in tried)
    for p in result["policies"]:
        assert result["capacity"][p] > 0
        assert set(result["rates"]) <= set(result["summaries"][p])
        # at its capacity a policy meets the SLOs for 90% of requests
        assert result["summaries"][p][result["capacity"][p]]["slo_attainment"] >= 0.9
    assert result["knobs"] == ControllerKnobs.for_profile(profile, SLOS)  # derived: the profile has no tuned knobs


def test_plan_cli_prints_table_and_plot(profile, tmp_path, capsys):
    path, png = tmp_path / "p.json", tmp_path / "plan.png"
    profile.save(path)
    argv = ["plan", "--profile", str(path), "--workload", "arxiv", "--slo", "ttft=3000,tpot=50",
            "--num-prompts", "40", "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("nexus", "chunked", "prefill-first", "static:", "capacity", "Recommended controller knobs"):
        assert name in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_cli_bad_input(tmp_path, capsys):
    assert main(["plan", "--profile", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "no profile" in err and "Traceback" not in err
