"""benchmarks/capacity.py on the CPU: the simulator backend's table and file, and the engine backend
on the tiny preset (a few short requests)."""
from __future__ import annotations

import json

import pytest

from benchmarks import capacity
from nexus_tune.engine.loader import resolve_config
from nexus_tune.core import metrics
from nexus_tune.core.testing import synthetic_profile

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
SMALL = ["--seeds", "0", "--min-duration", "0", "--arrivals", "poisson", "--rel-tol", "0.1"]


def results(out) -> dict:
    (result,) = json.loads((out / "capacity.json").read_text())["results"]
    return result


def test_the_simulator_backend_reports_every_column_with_its_brackets(tmp_path):
    assert capacity.main(["--setups", "synthetic-132sm", "--num-prompts", "60", "--tune-trials", "2",
                          "--statics", "64,96", *SMALL, "--arrivals", "poisson,bursty", "--out", str(tmp_path)]) == 0
    for row in results(tmp_path)["rows"].values():
        cells = row["cells"]
        assert set(cells) == {"nexus", "tuned", "chunked", "prefill-first", "static:64", "static:96"}
        assert row["best_static"] == max(("static:64", "static:96"), key=lambda p: cells[p]["mean"])
        for cell in cells.values():
            seed = cell["seeds"]["0"]
            good, bad = seed["bracket"]
            assert good == cell["mean"] > 0 and (bad is None or bad > good)
            passed = {float(r) for r, a in seed["tried"].items() if a >= metrics.ATTAINMENT_TARGET}
            assert max(passed) == good


def test_the_engine_backend_replays_rates_through_the_engine(tmp_path):
    profile = synthetic_profile(model_name="tiny", config_hash=resolve_config("tiny").config_hash())
    path = profile.save(tmp_path / "tiny.json")
    argv = ["--backend", "engine", "--setups", "synthetic-132sm", "--model", "tiny", "--device", "cpu",
            "--profile", str(path), "--statics", "64", "--columns", "nexus", "--num-prompts", "4",
            "--max-model-len", "128", "--max-output", "4", "--max-evals", "2", *SMALL, "--out", str(tmp_path)]
    assert capacity.main(argv) == 0
    cells = results(tmp_path)["rows"]["poisson"]["cells"]
    assert set(cells) == {"nexus", "static:64"}
    assert all(len(c["seeds"]["0"]["tried"]) == 2 for c in cells.values())
