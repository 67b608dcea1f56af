"""The simulator honors a decode pause as the engine's loops do (nexus_tune/core/scheduler.py)."""
from dataclasses import replace

from nexus_tune.core import simulator
from nexus_tune.core.latency_model import LatencyModel
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.workload import make_trace

TOTAL = 132
PROFILE = synthetic_profile(TOTAL, 8)


def test_decode_pauses_beside_no_decode_step_and_every_request_completes(monkeypatch):
    steps = []  # (start s, end s, loop, SMs, requests decoding at launch)
    step_ms = simulator._Simulation._step_ms

    def logged(self, loop, sms, prefill=None, decode=None, beside=None, beside_decode=0):
        ms, seen = step_ms(self, loop, sms, prefill, decode, beside, beside_decode)
        steps.append((self.now, self.now + ms * 1e-3, loop, sms, self.sched.stats()["num_decoding"]))
        return ms, seen

    monkeypatch.setattr(simulator._Simulation, "_step_ms", logged)
    # Bursts past what the splits prefill in time, after decode banked slack on the whole GPU.
    result = simulator.simulate(PROFILE, make_trace("mixed", 100, 12.0, 0.5, seed=0), "nexus")
    assert all(r.success for r in result.records)
    pauses = [(a, b) for a, b, loop, sms, decoding in steps if loop == "prefill" and sms == TOTAL and decoding]
    decode = [(a, b) for a, b, loop, *_ in steps if loop == "decode"]
    assert pauses  # the whole GPU to prefill while requests decode
    assert not any(a < d_end and d_start < b for a, b in pauses for d_start, d_end in decode)


def test_prefill_steps_beside_a_running_decode_are_priced_slower(monkeypatch):
    prefills = []  # (SMs, decoding sequences beside it)
    step_ms = simulator._Simulation._step_ms

    def logged(self, loop, sms, prefill=None, decode=None, beside=None, beside_decode=0):
        if loop == "prefill":
            prefills.append((sms, beside_decode))
        return step_ms(self, loop, sms, prefill, decode, beside, beside_decode)

    monkeypatch.setattr(simulator._Simulation, "_step_ms", logged)
    trace = make_trace("mixed", 60, 6.0, 0.5, seed=1)
    plain = simulator.simulate(PROFILE, trace, "static:104")
    slowed = replace(PROFILE, latency_model=LatencyModel.from_dict(PROFILE.latency_model.to_dict()))
    slowed.latency_model.prefill_contention_ = 1.0
    stretched = simulator.simulate(slowed, trace, "static:104")
    assert any(beside for _, beside in prefills) and any(not beside for _, beside in prefills)
    ttft = [sum(r.ttft_ms for r in result.records) for result in (plain, stretched)]
    assert ttft[1] > ttft[0]
