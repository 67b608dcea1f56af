"""The SLOs reach the nexus controller from every front door, in one syntax (ttft=MS,tpot=MS):
`serve --slo`, `LLM(..., slo=...)`; simulate, tune and plan take `--slo` (their own tests)."""
from __future__ import annotations

import socket

import pytest

from nexus_tune.engine.llm import LLM, EngineError
from nexus_tune.engine.loader import resolve_config
from nexus_tune.commands.cli import main
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.testing import synthetic_profile

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller_knobs(core) -> ControllerKnobs:
    return core.scheduler.controller.knobs


def test_serve_slo_reaches_the_controller(tmp_path, monkeypatch):
    apps = []
    monkeypatch.setattr("nexus_tune.commands.serve.serve", lambda app, host, port: apps.append(app))  # built, not served
    tiny = resolve_config("tiny").config_hash()  # a profile file must name the model it serves
    path = synthetic_profile(model_name="tiny", config_hash=tiny).save(tmp_path / "p.json")
    argv = ["serve", "--model", "tiny", "--device", "cpu", "--profile", str(path), "--port", str(free_port())]
    assert main([*argv, "--slo", "ttft=2000,tpot=40"]) == 0
    engine = apps[0].state.server.engine
    try:
        knobs = controller_knobs(engine.core)
        assert knobs.mode == "slo" and (knobs.ttft_ms, knobs.tbt_ms) == (2000.0, 40.0)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("slo", ["ttft=2000,tpot=40", {"ttft": 2000, "tpot": 40}, ["ttft:2000", "tpot:40"]])
def test_llm_takes_the_slos(profile, slo):
    with LLM("tiny", policy="nexus", device="cpu", profile=profile, slo=slo) as llm:
        assert controller_knobs(llm.core) == ControllerKnobs.for_profile(profile, {"ttft": 2000.0, "tpot": 40.0})


def test_without_slos_nexus_plans_for_the_defaults_derived_from_its_profile(profile):
    with LLM("tiny", policy="nexus", device="cpu", profile=profile) as llm:
        assert controller_knobs(llm.core) == ControllerKnobs.for_profile(profile)


def test_a_malformed_slo_is_refused_before_the_engine_starts(profile):
    with pytest.raises(EngineError, match="not a number"):
        LLM("tiny", policy="nexus", device="cpu", profile=profile, slo="tpot=fast")
