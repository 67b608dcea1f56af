import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_tune.core.block_manager import BlockManager
from nexus_tune.core.controller import ControllerKnobs, StepState
from nexus_tune.core.testing import synthetic_latency_model
from nexus_tune.core.scheduler import DecodeBatch, MixedBatch, PrefillBatch, Scheduler, parse_policy
from nexus_tune.core.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4
TOTAL = 132
SPLITS = list(range(8, 128, 8))
MODEL = synthetic_latency_model(TOTAL, 8)
POLICIES = ["nexus", "static:64", "chunked", "prefill-first"]


def next_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for the model: the next token depends on the whole history."""
    return (sum(token_ids) * 31 + len(token_ids)) % 997


def make_seq(i: int, prompt: int, max_tokens: int, arrival: float = 0.0) -> Sequence:
    return Sequence(f"r{i}", [(7 * i + j) % 50 for j in range(prompt)], SamplingParams(max_tokens=max_tokens),
                    arrival)


def reference_output(seq: Sequence) -> list[int]:
    tokens = list(seq.token_ids)
    for _ in range(seq.params.max_tokens):
        tokens.append(next_token(tokens))
    return tokens[seq.num_prompt_tokens:]


def make_scheduler(policy: str, num_blocks: int = 10_000, knobs: ControllerKnobs | None = None,
                   **kw) -> Scheduler:
    return Scheduler(policy, BlockManager(num_blocks, BS), knobs, total_sms=TOTAL, split_sms=SPLITS, model=MODEL, **kw)


def check_kv(sched: Scheduler, seqs: list[Sequence]) -> None:
    held = [b for s in seqs for b in s.block_table]
    assert len(held) == len(set(held)), "a KV block is owned twice"
    assert len(held) + sched.bm.num_free + sched.bm.num_fenced == sched.bm.num_blocks


def check_prefill(sched: Scheduler, batch: PrefillBatch, budget: int) -> None:
    assert 0 < batch.num_tokens <= budget
    for seq, n, prefix, last in zip(batch.seqs, batch.chunk_lens, batch.prefix_lens, batch.last):
        assert seq.status is SequenceStatus.PREFILLING and seq.in_flight
        assert n > 0 and prefix == seq.num_computed_tokens
        assert last == (prefix + n == seq.num_tokens)  # a recomputed one re-prefills its outputs too
        assert len(seq.block_table) * BS >= prefix + n


def check_decode(sched: Scheduler, batch: DecodeBatch) -> None:
    assert 0 < len(batch.seqs) <= sched.max_num_seqs
    assert batch.kv_lens == [s.num_tokens + s.num_pending - 1 for s in batch.seqs]  # the step's own token counted
    for seq, kv in zip(batch.seqs, batch.kv_lens):
        assert seq.status is SequenceStatus.DECODING and seq.in_flight
        assert len(seq.block_table) * BS >= kv


def finish_prefill(sched: Scheduler, batch: PrefillBatch, now: float, fence=None) -> None:
    tokens = [next_token(s.token_ids) if last else -1 for s, last in zip(batch.seqs, batch.last)]
    done = [s.seq_id for s, last in zip(batch.seqs, batch.last)
            if last and s.num_output_tokens + 1 >= s.params.max_tokens]
    sched.finish_prefill(batch, now, tokens, done, fence)


def finish_decode(sched: Scheduler, batch: DecodeBatch, now: float, fence=None) -> None:
    tokens = [next_token(s.token_ids) for s in batch.seqs]
    done = [s.seq_id for s in batch.seqs if s.num_output_tokens + 1 >= s.params.max_tokens]
    sched.finish_decode(batch, now, tokens, done, fence)


def drive(sched: Scheduler, seqs: list[Sequence], aborts: dict[int, list[str]] | None = None,
          max_ticks: int = 100_000) -> None:
    """Run every request to the end as the engine's loops would: in the two-loop policies a prefill
    step lasts 3 ticks and a decode step 1, side by side, the next decode step scheduled while the
    previous one runs (lookahead); checks the KV invariants every tick.
    `aborts` maps a tick to the requests the client drops then (before that tick's steps end)."""
    pending = sorted(seqs, key=lambda s: s.arrival_time)
    prefill = step = None
    decode: list[tuple[DecodeBatch, int]] = []  # in flight, oldest first
    for t in range(max_ticks):
        while pending and pending[0].arrival_time <= t:
            sched.add(pending.pop(0))
        for seq_id in (aborts or {}).get(t, []):
            sched.abort(seq_id)
        if prefill and prefill[1] <= t:
            finish_prefill(sched, prefill[0], t)
            prefill = None
        while decode and decode[0][1] <= t:
            finish_decode(sched, decode.pop(0)[0], t)
        if step is not None:
            for part in (step.decode, step.prefill) if isinstance(step, MixedBatch) else (step,):
                if isinstance(part, PrefillBatch):
                    finish_prefill(sched, part, t)
                elif isinstance(part, DecodeBatch):
                    finish_decode(sched, part, t)
            step = None
        check_kv(sched, seqs)  # an aborted sequence holds its blocks until its batch ends
        if not pending and not sched.num_unfinished and prefill is None and not decode:
            return  # (a batch in flight may still hold an aborted request's blocks)
        if sched.two_loops:
            if prefill is None and (b := sched.schedule_prefill(t)) is not None:
                check_prefill(sched, b, sched.knobs.prefill_chunk_tokens)
                assert b.sms in SPLITS or b.sms == TOTAL
                prefill = (b, t + 3)
            if len(decode) < 2 and (b := sched.schedule_decode(t)) is not None:
                check_decode(sched, b)
                assert b.sms in [TOTAL - s for s in SPLITS] or b.sms == TOTAL
                assert b.sms + (prefill[0].sms if prefill else 0) <= TOTAL  # disjoint SM sets
                decode.append((b, (decode[-1][1] if decode else t) + 1))  # runs after the one in flight
        elif sched.policy == "chunked":
            step = sched.schedule_mixed(t)
            if step is not None:
                tokens = step.prefill.num_tokens if step.prefill else 0
                assert tokens + (len(step.decode.seqs) if step.decode else 0) <= sched.mixed_token_budget
                if step.prefill:
                    check_prefill(sched, step.prefill, sched.mixed_token_budget)
                if step.decode:
                    check_decode(sched, step.decode)
        else:
            step = sched.schedule_step(t)
            if isinstance(step, PrefillBatch):
                check_prefill(sched, step, sched.mixed_token_budget)
            elif step is not None:
                check_decode(sched, step)
    raise AssertionError(f"not done after {max_ticks} ticks: {sched.stats()}")


def always_pause(s: StepState) -> int:
    """A controller that pauses decode whenever prompts wait: the whole GPU to prefill."""
    return TOTAL if s.queued_prefill_tokens else 0


def workload(n: int = 16) -> list[Sequence]:
    return [make_seq(i, prompt=12 + 9 * (i % 5), max_tokens=10 + 7 * (i % 4), arrival=i // 3) for i in range(n)]


# -- sequences and policies ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"seed": 1.5}, "seed"), ({"stop": [""]}, "stop"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_sampling_params_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_stop_string():
    p = SamplingParams(stop="###", top_k=0, seed=3)
    assert p.stop == ["###"] and p.max_tokens == 16 and p.temperature == 1.0 and not p.ignore_eos


def test_sequence_token_views():
    s = Sequence("a", [1, 2, 3])
    s.token_ids.append(9)
    assert (s.prompt_token_ids, s.output_token_ids, s.num_tokens, s.num_output_tokens) == ([1, 2, 3], [9], 4, 1)
    with pytest.raises(ValueError, match="prompt"):
        Sequence("b", [])


def test_parse_policy():
    assert parse_policy("nexus") == ("nexus", None)
    assert parse_policy("static:64") == ("static", 64)
    for bad in ("static", "static:x", "vllm", "chunked:3"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy(bad)


def test_policy_needs_what_it_uses():
    with pytest.raises(ValueError, match="not a pre-created split"):
        make_scheduler("static:60")
    with pytest.raises(ValueError, match="latency model"):
        Scheduler("nexus", BlockManager(8, BS), total_sms=TOTAL, split_sms=SPLITS)
    Scheduler("chunked", BlockManager(8, BS))  # single-loop baselines need no split


def test_wrong_call_for_the_policy_is_an_error():
    with pytest.raises(RuntimeError, match="schedule_mixed"):
        make_scheduler("nexus").schedule_mixed(0.0)
    with pytest.raises(RuntimeError, match="schedule_prefill"):
        make_scheduler("chunked").schedule_prefill(0.0)


# -- completion, preemption, aborts, fences ------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_completes_every_request_with_identical_outputs(policy):
    seqs = workload()
    expected = [reference_output(s) for s in seqs]
    sched = make_scheduler(policy)
    drive(sched, seqs)
    assert sched.num_preemptions == 0
    assert all(s.status is SequenceStatus.FINISHED and s.block_table == [] for s in seqs)
    assert [s.output_token_ids for s in seqs] == expected
    assert sched.bm.num_free == sched.bm.num_blocks


@pytest.mark.parametrize("policy", POLICIES)
def test_a_kv_budget_too_small_preempts_and_still_completes_every_request(policy):
    seqs = workload()
    expected = [reference_output(s) for s in seqs]
    # The largest request needs 48 + 31 - 1 tokens = 20 blocks: each fits alone, the load does not.
    sched = make_scheduler(policy, num_blocks=24, knobs=ControllerKnobs(prefill_chunk_tokens=16),
                           mixed_token_budget=32)
    drive(sched, seqs)
    assert sched.num_preemptions > 0
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert [s.output_token_ids for s in seqs] == expected
    assert sched.bm.num_free == sched.bm.num_blocks
    stats = sched.stats()
    assert (stats["queued_prefill_tokens"], stats["num_decoding"], stats["decode_kv_tokens"]) == (0, 0, 0)


def test_add_rejects_a_request_that_can_never_fit():
    sched = make_scheduler("static:64", num_blocks=10)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make_seq(0, prompt=30, max_tokens=20))  # 49 tokens > 40
    sched.add(make_seq(1, prompt=30, max_tokens=11))  # 40 tokens: fits exactly
    with pytest.raises(ValueError, match="already queued"):
        sched.add(make_seq(1, prompt=30, max_tokens=11))


def test_aborts_return_their_blocks_wherever_the_request_is():
    sched = make_scheduler("static:64", knobs=ControllerKnobs(prefill_chunk_tokens=16))
    decoding, partial, waiting = make_seq(0, 8, 50), make_seq(1, 40, 5, 0.5), make_seq(2, 8, 5, 0.6)
    sched.add(decoding)
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.1)
    sched.add(partial)
    finish_prefill(sched, sched.schedule_prefill(0.5), 0.7)  # 16 of 40 tokens
    sched.add(waiting)
    assert decoding.status is SequenceStatus.DECODING and partial.status is SequenceStatus.PREFILLING
    for seq in (decoding, partial, waiting):
        assert sched.abort(seq.seq_id)
        assert seq.status is SequenceStatus.ABORTED and seq.block_table == []
    assert not sched.abort("r0") and not sched.abort("nobody")
    assert sched.bm.num_free == sched.bm.num_blocks and sched.num_unfinished == 0
    assert sched.stats()["queued_prefill_tokens"] == 0


def test_an_abort_in_flight_frees_when_the_batch_finishes():
    sched = make_scheduler("static:64")
    seq = make_seq(0, 20, 5)
    sched.add(seq)
    batch = sched.schedule_prefill(0.0)
    assert sched.abort(seq.seq_id)
    assert seq.block_table, "the kernel in flight still writes these blocks"
    sched.finish_prefill(batch, 1.0, [7])
    assert seq.block_table == [] and seq.output_token_ids == [] and sched.bm.num_free == sched.bm.num_blocks


def _decoding(sched: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        sched.add(seq)
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.1)
    assert all(s.status is SequenceStatus.DECODING for s in seqs)


@pytest.mark.parametrize("policy", ["static:64", "prefill-first", "chunked"])
def test_lookahead_decode_rides_the_pending_token_and_frees_after_the_last_batch(policy):
    """Step n+1 is scheduled while step n runs: its rows carry step n's tokens as pending (KV one
    longer); a sequence that stops in step n rides in n+1 and frees its blocks once n+1 finished;
    one whose pending token is its last (max_tokens) is left out."""
    sched = make_scheduler(policy)
    stops, last, goes_on = make_seq(0, 8, 50), make_seq(1, 8, 2), make_seq(2, 8, 50)
    for seq in (stops, last, goes_on):
        sched.add(seq)
    schedule = {"static:64": sched.schedule_prefill, "prefill-first": sched.schedule_step,
                "chunked": lambda t: sched.schedule_mixed(t).prefill}[policy]
    finish_prefill(sched, schedule(0.0), 0.1)
    decode = sched.schedule_decode if policy == "static:64" else \
        sched.schedule_step if policy == "prefill-first" else (lambda t: sched.schedule_mixed(t).decode)
    n = decode(1.0)
    assert [s.seq_id for s in n.seqs] == ["r0", "r1", "r2"] and n.pending == [False] * 3
    n1 = decode(1.1)  # step n still running
    assert [s.seq_id for s in n1.seqs] == ["r0", "r2"]  # r1's pending token is its second and last
    assert n1.pending == [True, True] and n1.kv_lens == [10, 10]
    assert stops.num_pending == 2 and stops.in_flight == 2
    with pytest.raises(RuntimeError):
        decode(1.2)  # at most one batch ahead
    sched.finish_decode(n, 1.3, [5, 6, 7], finished=["r0", "r1"])
    assert stops.status is SequenceStatus.FINISHED and stops.block_table, "step n+1 still reads its KV"
    assert last.block_table == [] and goes_on.token_ids[-1] == 7
    sched.finish_decode(n1, 1.4, [9, 8])
    assert stops.block_table == [] and stops.output_token_ids[1:] == [5]  # its n+1 token was dropped
    assert goes_on.output_token_ids[1:] == [7, 8] and goes_on.num_pending == 0 and not goes_on.in_flight
    check_kv(sched, [stops, last, goes_on])


def test_lookahead_abort_frees_after_every_batch_holding_it():
    sched = make_scheduler("static:64")
    seq = make_seq(0, 8, 50)
    _decoding(sched, seq)
    n, n1 = sched.schedule_decode(1.0), sched.schedule_decode(1.1)
    assert sched.abort(seq.seq_id)
    sched.finish_decode(n, 1.2, [1])
    assert seq.block_table, "step n+1 still reads its KV"
    sched.finish_decode(n1, 1.3, [2])
    assert seq.block_table == [] and sched.bm.num_free == sched.bm.num_blocks


def test_single_loop_policies_look_ahead_only_past_decode_rows():
    sched = make_scheduler("chunked")
    sched.add(make_seq(0, 8, 50))
    step = sched.schedule_mixed(0.0)
    assert step.prefill is not None
    with pytest.raises(RuntimeError, match="schedule_mixed"):
        sched.schedule_mixed(0.1)  # prompt chunks in flight: finish them first


class Flag:
    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def test_blocks_freed_behind_a_fence_are_not_reused_until_it_passes():
    sched = make_scheduler("static:64", num_blocks=6)
    first, second = make_seq(0, 16, 2), make_seq(1, 16, 2, 1.0)
    sched.add(first)
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.5)
    fence = Flag()
    finish_decode(sched, sched.schedule_decode(0.5), 0.6, fence)  # first finishes on the decode stream
    assert first.status is SequenceStatus.FINISHED and sched.bm.num_fenced == 5
    sched.add(second)
    assert sched.schedule_prefill(1.0) is None  # 1 free block, 4 needed, 5 behind the fence
    fence.done = True
    batch = sched.schedule_prefill(1.1)
    assert batch is not None and batch.seqs == [second]


# -- queue order and batch composition -----------------------------------------------------------

def prefill_order(policy: str, arrivals: dict[str, tuple[int, float]], now: float, gamma: float = 15.0) -> list[str]:
    sched = make_scheduler(policy, knobs=ControllerKnobs(gamma=gamma, prefill_chunk_tokens=100_000))
    for i, (name, (prompt, arrival)) in enumerate(arrivals.items()):
        sched.add(Sequence(name, [1] * prompt, SamplingParams(max_tokens=4), arrival))
    return [s.seq_id for s in sched.schedule_prefill(now).seqs]


def test_prefill_queue_is_shortest_remaining_first_with_aging():
    # score = remaining tokens - gamma x waiting ms, lowest first
    reqs = {"long": (1000, 0.0), "short": (100, 0.05), "mid": (400, 0.04)}
    # at 50 ms: long 1000 - 15*50 = 250, mid 400 - 15*10 = 250 (tie: earlier queued first), short 100
    assert prefill_order("static:64", reqs, now=0.05) == ["short", "long", "mid"]
    assert prefill_order("static:64", reqs, now=0.05, gamma=0.0) == ["short", "mid", "long"]  # pure SRPT
    # long waited 100 ms more than short: 1000 - 15*200 < 100 - 15*100
    reqs["short"] = (100, 0.1)
    assert prefill_order("static:64", reqs, now=0.2)[0] == "long"


def test_a_partly_prefilled_request_competes_by_its_remaining_tokens():
    sched = make_scheduler("static:64", knobs=ControllerKnobs(gamma=0.0, prefill_chunk_tokens=300))
    sched.add(make_seq(0, 400, 4))
    finish_prefill(sched, sched.schedule_prefill(0.0), 1.0)  # 100 left
    sched.add(make_seq(1, 150, 4, 1.0))
    batch = sched.schedule_prefill(1.0)
    assert [s.seq_id for s in batch.seqs] == ["r0", "r1"] and batch.chunk_lens == [100, 150]
    assert batch.prefix_lens == [300, 0] and batch.last == [True, True]


def test_chunked_batches_follow_vllm_v1():
    sched = make_scheduler("chunked", mixed_token_budget=100, max_num_seqs=4)
    for i, prompt in enumerate((10, 10, 200)):
        sched.add(make_seq(i, prompt, 50, arrival=i))
    step = sched.schedule_mixed(0.0)  # waiting, first come first served, the last one chunked
    assert step.decode is None and step.prefill.chunk_lens == [10, 10, 80]
    finish_prefill(sched, step.prefill, 1.0)
    sched.add(make_seq(3, 30, 50, arrival=3))
    sched.add(make_seq(4, 50, 50, arrival=4))
    step = sched.schedule_mixed(1.0)  # running first: decodes get 1 token, the partial one the rest
    assert [s.seq_id for s in step.decode.seqs] == ["r0", "r1"]
    assert [s.seq_id for s in step.prefill.seqs] == ["r2"] and step.prefill.chunk_lens == [98]
    finish_decode(sched, step.decode, 2.0)
    finish_prefill(sched, step.prefill, 2.0)
    step = sched.schedule_mixed(2.0)  # r2's last 22 tokens, then waiting ones up to max_num_seqs = 4
    assert [s.seq_id for s in step.decode.seqs] == ["r0", "r1"]
    assert [s.seq_id for s in step.prefill.seqs] == ["r2", "r3"] and step.prefill.chunk_lens == [22, 30]


def test_chunked_admits_nothing_new_in_a_step_that_preempted():
    sched = make_scheduler("chunked", num_blocks=6, mixed_token_budget=100)
    for i, prompt in enumerate((4, 4, 16)):  # 1 + 1 + 4 blocks: the cache is full
        sched.add(make_seq(i, prompt, 8, arrival=i))
    finish_prefill(sched, sched.schedule_mixed(0.0).prefill, 1.0)
    sched.add(make_seq(3, 4, 8, arrival=3))
    step = sched.schedule_mixed(1.0)  # r0 needs a 2nd block: the newest running one (r2) is preempted
    assert [s.seq_id for s in step.decode.seqs] == ["r0", "r1"] and step.prefill is None
    assert sched.num_preemptions == 1 and sched.stats()["num_waiting"] == 2
    assert sched.bm.num_free == 2  # free, yet r3 waits for the next step, as in vLLM


def test_prefill_first_runs_a_prefill_whenever_one_is_ready():
    sched = make_scheduler("prefill-first")
    sched.add(make_seq(0, 10, 20))
    finish_prefill(sched, sched.schedule_step(0.0), 1.0)
    assert isinstance(step := sched.schedule_step(1.0), DecodeBatch)
    finish_decode(sched, step, 2.0)
    sched.add(make_seq(1, 10, 20, 2.0))
    assert isinstance(step := sched.schedule_step(2.0), PrefillBatch) and step.sms == TOTAL
    finish_prefill(sched, step, 3.0)
    step = sched.schedule_step(3.0)
    assert isinstance(step, DecodeBatch) and [s.seq_id for s in step.seqs] == ["r0", "r1"]


def test_decode_is_first_come_first_served_up_to_max_num_seqs():
    sched = make_scheduler("static:64", max_num_seqs=3)
    for i in range(5):
        sched.add(make_seq(i, 10, 20, arrival=i * 0.01))
    batch = sched.schedule_prefill(0.1)
    assert len(batch.seqs) == 3  # admission stops at max_num_seqs
    finish_prefill(sched, batch, 0.2)
    assert [s.seq_id for s in sched.schedule_decode(0.2).seqs] == ["r0", "r1", "r2"]


# -- splits of the two-loop policies -------------------------------------------------------------

def test_nexus_gives_the_whole_gpu_to_the_only_busy_phase_and_never_overlaps():
    sched = make_scheduler("nexus")
    sched.add(make_seq(0, 100, 20))
    batch = sched.schedule_prefill(0.0)
    assert batch.sms == TOTAL  # nothing decodes
    finish_prefill(sched, batch, 0.1)
    decode = sched.schedule_decode(0.1)
    assert decode.sms == TOTAL  # no prefill waits
    sched.add(make_seq(1, 100, 20, 0.11))
    assert sched.schedule_prefill(0.11) is None  # the decode step in flight holds every SM
    finish_decode(sched, decode, 0.12)
    batch = sched.schedule_prefill(0.12)
    assert batch.sms in SPLITS
    decode = sched.schedule_decode(0.12)
    assert decode.sms + batch.sms <= TOTAL


def test_a_decode_pause_idles_decode_until_a_prefill_step_on_the_whole_gpu():
    sched = make_scheduler("nexus", knobs=ControllerKnobs(prefill_chunk_tokens=100))
    sched.add(make_seq(0, 50, 20))
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.1)
    sched.add(make_seq(1, 400, 20, 0.1))  # four chunks
    prefill = sched.schedule_prefill(0.1)
    assert prefill.sms in SPLITS
    sched.controller.decide = always_pause
    assert sched.schedule_decode(0.11) is None  # decode waits for the prefill in flight ...
    assert sched.schedule_decode(0.12) is None
    finish_prefill(sched, prefill, 0.15)
    prefill = sched.schedule_prefill(0.15)
    assert prefill.sms == TOTAL  # ... and the next step, on the whole GPU
    assert sched.schedule_decode(0.16) is None
    sched.controller.decide = lambda s: 64  # the slack is spent: the split again
    finish_prefill(sched, prefill, 0.2)
    assert sched.schedule_prefill(0.2).sms == 64
    assert sched.schedule_decode(0.2).sms == TOTAL - 64


def test_the_whole_gpu_prefill_of_a_pause_waits_for_the_lookahead_decode_step():
    sched = make_scheduler("nexus", knobs=ControllerKnobs(prefill_chunk_tokens=100))
    sched.add(make_seq(0, 50, 20))
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.1)
    sched.add(make_seq(1, 400, 20, 0.1))
    prefill, decode = sched.schedule_prefill(0.1), sched.schedule_decode(0.1)
    sched.controller.decide = always_pause
    assert sched.schedule_decode(0.11) is None  # the lookahead step: decode pauses
    finish_prefill(sched, prefill, 0.12)
    assert sched.schedule_prefill(0.12) is None  # the decode step in flight still holds its SMs
    finish_decode(sched, decode, 0.13)
    assert sched.schedule_prefill(0.13).sms == TOTAL


def test_a_decode_pause_never_stalls_decode_when_no_prompt_can_be_admitted():
    sched = make_scheduler("nexus", max_num_seqs=1)
    sched.add(make_seq(0, 50, 20))
    finish_prefill(sched, sched.schedule_prefill(0.0), 0.1)
    sched.add(make_seq(1, 50, 20, 0.1))  # waits for a free sequence slot
    sched.controller.decide = always_pause
    assert sched.schedule_prefill(0.1) is None
    decode = sched.schedule_decode(0.1)
    assert decode.sms == TOTAL  # no prefill runs: decode takes the free GPU, the pause would follow it
    finish_decode(sched, decode, 0.11)
    assert sched.schedule_prefill(0.11) is None  # still no room: the pause is dropped
    assert sched.schedule_decode(0.11) is not None


@pytest.mark.parametrize("quantile, slack_ms", [(0.0, 30.0), (1.0, 110.0)])
def test_the_decode_slack_is_the_tpot_slack_banked_at_the_quantile(quantile, slack_ms):
    knobs = ControllerKnobs(tbt_ms=50, tbt_margin=0.2, pause_quantile=quantile, prefill_chunk_tokens=100)
    sched = make_scheduler("nexus", knobs=knobs)  # a TBT target of 40 ms
    states = []
    sched.controller.decide = lambda s: states.append(s) or 64
    sched.add(make_seq(0, 50, 20))
    finish_prefill(sched, sched.schedule_prefill(0.0), 1.0)  # first token at 1 s
    for t in (1.01, 1.02, 1.03):  # three more, 10 ms apart: next one due at 1000 + 4 x 40 ms
        finish_decode(sched, sched.schedule_decode(t), t)
    sched.add(make_seq(1, 50, 20, 1.03))
    finish_prefill(sched, sched.schedule_prefill(1.03), 1.04)  # first token at 1.04 s: next due at 1080 ms
    sched.add(make_seq(2, 50, 20, 1.05))
    sched.schedule_prefill(1.05)
    assert states[-1].decode_slack_ms == pytest.approx(slack_ms)  # the least, the most, at 1050 ms


def test_static_keeps_its_split():
    sched = make_scheduler("static:40")
    sched.add(make_seq(0, 100, 20))
    batch = sched.schedule_prefill(0.0)
    assert batch.sms == 40
    finish_prefill(sched, batch, 0.1)
    assert sched.schedule_decode(0.1).sms == TOTAL - 40


# -- threads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pause", [False, True], ids=["splits", "decode pauses"])
def test_two_threads_drive_the_scheduler_to_completion(pause):
    """The engine's prefill and decode loops, as threads sharing one scheduler."""
    seqs = workload(24)
    expected = [reference_output(s) for s in seqs]
    sched = make_scheduler("nexus", num_blocks=40, knobs=ControllerKnobs(prefill_chunk_tokens=24))
    if pause:
        sched.controller.decide = always_pause
    for s in seqs:
        sched.add(s)
    errors = []

    def loop(schedule, finish):
        try:
            t = 0.0
            while sched.num_unfinished:
                t += 1e-3
                batch = schedule(t)
                if batch is None:
                    sched.wait(0.001)
                else:
                    finish(sched, batch, t)
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(sched.schedule_prefill, finish_prefill), daemon=True),
               threading.Thread(target=loop, args=(sched.schedule_decode, finish_decode), daemon=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)
    assert [s.output_token_ids for s in seqs] == expected
    assert sched.bm.num_free == sched.bm.num_blocks


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from([*POLICIES, "nexus-pausing"]), num_blocks=st.integers(14, 60), chunk=st.integers(1, 64),
       lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 16), st.integers(0, 6)), min_size=1, max_size=14),
       abort_ticks=st.lists(st.one_of(st.none(), st.integers(0, 30)), max_size=14))
def test_random_loads_complete_with_identical_outputs(policy, num_blocks, chunk, lengths, abort_ticks):
    """Any load whose requests each fit the cache completes, preempted or not, with the reference
    outputs; requests aborted anywhere (queued, prefilling, decoding, in flight) return their blocks.
    `nexus-pausing`: decode pauses whenever prompts wait (the protocol under the most pauses)."""
    seqs = [make_seq(i, prompt, out, arrival) for i, (prompt, out, arrival) in enumerate(lengths)]
    expected = [reference_output(s) for s in seqs]
    aborts: dict[int, list[str]] = {}
    for seq, tick in zip(seqs, abort_ticks):
        if tick is not None:
            aborts.setdefault(tick, []).append(seq.seq_id)
    sched = make_scheduler(policy.removesuffix("-pausing"), num_blocks=num_blocks,
                           knobs=ControllerKnobs(prefill_chunk_tokens=chunk), mixed_token_budget=chunk + 8, max_num_seqs=8)
    if policy.endswith("-pausing"):
        sched.controller.decide = always_pause
    drive(sched, seqs, aborts)
    for seq, want in zip(seqs, expected):
        assert seq.output_token_ids == want if seq.status is SequenceStatus.FINISHED else seq.block_table == []
    assert sched.bm.num_free == sched.bm.num_blocks
    assert sched.stats()["queued_prefill_tokens"] == sched.stats()["decode_kv_tokens"] == 0


@given(st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 16384)), min_size=1, max_size=6))
def test_a_prefill_batch_counts_the_causal_pairs_its_chunks_attend(chunks):
    seqs = [make_seq(i, n + p, 1) for i, (n, p) in enumerate(chunks)]
    batch = PrefillBatch(seqs, [n for n, _ in chunks], [p for _, p in chunks], [True] * len(chunks))
    # Token j of a chunk over prefix p attends to p + j + 1 keys.
    assert batch.attention_pairs == sum(sum(p + j + 1 for j in range(n)) for n, p in chunks)
    # never more than one chunk of all the tokens over all the prefixes
    assert batch.attention_pairs <= batch.num_tokens * batch.prefix_tokens + batch.num_tokens * (batch.num_tokens + 1) // 2
    # priced as one chunk over the prefix that attends as many pairs: never above the summed prefix,
    # a single chunk at its own prefix
    assert 0 <= batch.priced_prefix <= batch.prefix_tokens
    if len(chunks) == 1:
        assert batch.priced_prefix == chunks[0][1]
