import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_tune.controller import Controller, ControllerKnobs, StepState, quantize_kv
from nexus_tune.profile import synthetic_latency_model

TOTAL = 132
SPLITS = list(range(8, 128, 8))  # what partition.split_sizes gives on an H100 (granularity 8)
MODEL = synthetic_latency_model(TOTAL, 8)


def constraints_met(knobs: ControllerKnobs, s: StepState, p: int) -> list[bool]:
    """The controller's constraints at prefill split p, recomputed from the model here."""
    d = TOTAL - p
    kv_p, kv_d = quantize_kv(s.prefill_kv), quantize_kv(s.decode_kv)
    if knobs.mode == "paper":
        if s.kv_usage <= knobs.kv_threshold:
            ref = MODEL.predict_decode(s.decode_batch, kv_d, TOTAL - min(SPLITS))  # decode's largest side
            return [MODEL.predict_decode(s.decode_batch, kv_d, d) <= knobs.beta * ref]
        ref = MODEL.predict_prefill(s.prefill_tokens, kv_p, max(SPLITS))  # prefill's largest side
        return [MODEL.predict_prefill(s.prefill_tokens, kv_p, p) <= knobs.alpha * ref]
    tbt = MODEL.predict_decode(s.decode_batch, kv_d, d, s.prefill_tokens, kv_p)
    drain = math.ceil(s.queued_prefill_tokens / s.prefill_tokens) * MODEL.predict_prefill(s.prefill_tokens, kv_p, p)
    return [tbt <= knobs.tbt_ms * (1 - knobs.tbt_margin),
            drain <= knobs.ttft_ms * (1 - knobs.ttft_margin) - s.oldest_wait_ms]


knob_st = st.builds(
    ControllerKnobs,
    mode=st.sampled_from(["paper", "slo"]),
    alpha=st.floats(1.0, 3.0), beta=st.floats(1.0, 3.0), kv_threshold=st.floats(0.0, 1.0),
    delta=st.floats(0.0, 0.3), ttft_ms=st.floats(100.0, 10_000.0), tbt_ms=st.floats(5.0, 200.0),
    ttft_margin=st.floats(0.0, 0.5), tbt_margin=st.floats(0.0, 0.5),
)


@st.composite
def state_st(draw, busy: bool = True) -> StepState:
    """A step state; with busy=True both phases have work."""
    queued = draw(st.integers(1, 200_000)) if busy else draw(st.integers(0, 200_000))
    batch = draw(st.integers(1, 256)) if busy else draw(st.integers(0, 256))
    return StepState(
        queued_prefill_tokens=queued,
        prefill_tokens=max(1, min(queued, draw(st.sampled_from([256, 512, 1024, 2048, 4096, 8192])))),
        prefill_kv=draw(st.integers(0, 32_768)),
        decode_batch=batch,
        decode_kv=batch * draw(st.integers(1, 16_384)),
        kv_usage=draw(st.floats(0.0, 1.0)),
        oldest_wait_ms=draw(st.floats(0.0, 10_000.0)),
    )


@settings(max_examples=150, deadline=None)
@given(knob_st, st.lists(state_st(busy=False), min_size=1, max_size=6))
def test_the_split_is_always_a_pre_created_one(knobs, states):
    c = Controller(MODEL, SPLITS, TOTAL, knobs)
    for s in states:
        p = c.decide(s)
        if s.queued_prefill_tokens == 0:
            assert p == 0  # the whole GPU to decode
        elif s.decode_batch == 0:
            assert p == TOTAL  # the whole GPU to prefill
        else:
            assert p in SPLITS


@settings(max_examples=150, deadline=None)
@given(knob_st, state_st())
def test_constraints_hold_whenever_they_can(knobs, s):
    p = Controller(MODEL, SPLITS, TOTAL, knobs).decide(s)
    met = {x: constraints_met(knobs, s, x) for x in SPLITS}
    if knobs.mode == "paper":
        feasible = [x for x in SPLITS if met[x][0]]
        if s.kv_usage <= knobs.kv_threshold:  # prefill-first: the most prefill SMs decode allows
            assert p == (max(feasible) if feasible else SPLITS[0])
        else:  # decode-first: the fewest prefill SMs prefill allows
            assert p == (min(feasible) if feasible else SPLITS[-1])
    else:
        tbt_ok = [x for x in SPLITS if met[x][0]]
        ttft_ok = [x for x in SPLITS if met[x][1]]
        assert p == max(max(tbt_ok, default=SPLITS[0]), min(ttft_ok, default=SPLITS[-1]))
        if ttft_ok:
            assert met[p][1]
        if tbt_ok and min(ttft_ok, default=TOTAL) <= max(tbt_ok):
            assert met[p][0]


@settings(max_examples=150, deadline=None)
@given(knob_st, st.lists(state_st(), min_size=2, max_size=8))
def test_hysteresis_small_moves_only_to_fix_a_broken_constraint(knobs, states):
    c = Controller(MODEL, SPLITS, TOTAL, knobs)
    prev = c.decide(states[0])
    for s in states[1:]:
        p = c.decide(s)
        if p != prev and abs(p - prev) <= knobs.delta * TOTAL:
            old, new = constraints_met(knobs, s, prev), constraints_met(knobs, s, p)
            assert any(n and not o for o, n in zip(old, new))
        prev = p


@settings(max_examples=100, deadline=None)
@given(knob_st, state_st())
def test_a_repeated_state_keeps_its_split(knobs, s):
    c = Controller(MODEL, SPLITS, TOTAL, knobs)
    assert c.decide(s) == c.decide(s) == c.decide(s)


@settings(max_examples=150, deadline=None)
@given(knob_st, state_st(), st.integers(0, 256), st.floats(1.0, 4.0))
def test_more_decode_load_never_gives_decode_fewer_sms(knobs, s, more_seqs, kv_growth):
    """slo mode: more sequences or longer contexts. paper mode: more sequences of the same length
    (its beta bound is relative to the whole GPU, and attention over longer contexts is memory-bound,
    saturating at fewer SMs, so there longer contexts may rightly need fewer decode SMs)."""
    per_seq = s.decode_kv / s.decode_batch
    batch = s.decode_batch + more_seqs
    kv = round(batch * per_seq * (kv_growth if knobs.mode == "slo" else 1.0))
    heavier = StepState(s.queued_prefill_tokens, s.prefill_tokens, s.prefill_kv, batch, kv, s.kv_usage,
                        s.oldest_wait_ms)
    p_light = Controller(MODEL, SPLITS, TOTAL, knobs).decide(s)
    p_heavy = Controller(MODEL, SPLITS, TOTAL, knobs).decide(heavier)
    assert TOTAL - p_heavy >= TOTAL - p_light


def test_paper_mode_switches_to_decode_first_above_the_kv_threshold():
    knobs = ControllerKnobs(delta=0)
    s = StepState(8192, 2048, 0, 128, 128 * 4096, 0.5, 0.0)
    prefill_first = Controller(MODEL, SPLITS, TOTAL, knobs).decide(s)
    decode_first = Controller(MODEL, SPLITS, TOTAL, knobs).decide(
        StepState(8192, 2048, 0, 128, 128 * 4096, 0.9, 0.0))
    # decode-first meets alpha on prefill only; prefill-first gives decode just what beta needs
    # (each against the phase's largest side of any split)
    assert MODEL.predict_prefill(2048, 0, decode_first) <= 1.3 * MODEL.predict_prefill(2048, 0, max(SPLITS))
    assert MODEL.predict_decode(128, 128 * 4096, TOTAL - prefill_first) <= 1.1 * MODEL.predict_decode(
        128, 128 * 4096, TOTAL - min(SPLITS))
    assert prefill_first != decode_first


def test_slo_mode_shifts_toward_prefill_as_the_ttft_deadline_nears():
    knobs = ControllerKnobs(mode="slo", ttft_ms=2000, tbt_ms=40, delta=0)
    shares = [Controller(MODEL, SPLITS, TOTAL, knobs).decide(StepState(20_000, 2048, 0, 128, 128 * 2048, 0.3, w))
              for w in (0.0, 500.0, 1000.0, 1500.0)]
    assert shares == sorted(shares) and shares[-1] > shares[0]


def test_cached_decisions_evaluate_the_model_a_few_times():
    c = Controller(MODEL, SPLITS, TOTAL, ControllerKnobs())
    s = StepState(4096, 2048, 0, 64, 64 * 1024, 0.3, 0.0)
    c.decide(s)
    first = c.evaluations
    c.decide(StepState(4096, 2048, 0, 64, 64 * 1024 - 64, 0.3, 1.0))  # rounds to the same KV
    assert c.evaluations == first
    c.clear_cache()
    c.decide(s)
    assert 2 <= c.evaluations - first <= 4  # greedy walk from the previous split


def test_kv_rounding_is_upward_and_fine():
    for kv in (0, 1, 127, 128, 129, 1000, 65_537, 3_000_001):
        assert kv <= quantize_kv(kv) <= kv * (1 + 1 / 64)
    assert quantize_kv(65_536) == 65_536 and quantize_kv(65_537) == 65_536 + 1024


def test_knobs_round_trip_and_validate():
    knobs = ControllerKnobs(mode="slo", ttft_ms=1500, tbt_ms=30, gamma=3.0, prefill_chunk_tokens=1024)
    assert ControllerKnobs.from_dict(knobs.to_dict()) == knobs
    assert ControllerKnobs.from_dict({}) == ControllerKnobs()
    with pytest.raises(ValueError, match="unknown controller knob"):
        ControllerKnobs.from_dict({"mode": "paper", "alfa": 1.2})
    with pytest.raises(ValueError, match="mode"):
        ControllerKnobs(mode="fast")
    with pytest.raises(ValueError, match="beta"):
        ControllerKnobs(beta=0.9)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        ControllerKnobs(prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="kv_threshold"):
        ControllerKnobs(kv_threshold=1.5)


def test_controller_needs_an_interior_split():
    with pytest.raises(ValueError, match="split"):
        Controller(MODEL, [0, TOTAL], TOTAL)
