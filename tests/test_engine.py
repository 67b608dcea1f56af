"""The engine's loops and front door (nexus_tune/engine/loops.py, nexus_tune/engine/llm.py) on the tiny model, on a CPU.

Every policy must produce exactly the greedy tokens of plain sequential generation (one request
at a time straight through ModelRunner: no scheduler, no batching, no chunking); preemption,
aborts and a failing request must not change that or leak KV blocks.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

import nexus_tune.engine.sampling as sampling
from nexus_tune.engine.llm import LLM, AsyncLLM, EngineError, load_profile
from nexus_tune.engine.model_runner import ModelRunner
from nexus_tune.engine.step_inputs import DecodeInput, PrefillInput
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.device import DeviceInfo
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.sequence import SamplingParams

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

POLICIES = ["nexus", "chunked", "prefill-first", "static:64"]
PROMPT_LENS = [3, 17, 40, 70, 9, 33]
MAX_TOKENS = [12, 5, 16, 9, 20, 1]
# Short prompts, long outputs: admitted while they are small, they outgrow the cache together.
GROWING_LENS, GROWING_TOKENS = [5, 12, 20, 8, 15, 3], 40
# Small budgets so that prompts are split into several chunks and batches mix sequences.
SMALL_BUDGETS = {"knobs": ControllerKnobs(prefill_chunk_tokens=32), "mixed_token_budget": 40}


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile()


@pytest.fixture(scope="module")
def runner():
    return ModelRunner("tiny", device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n).tolist() for n in PROMPT_LENS]


def sequential(runner: ModelRunner, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one request alone: a whole-prompt prefill, then one decode step per token."""
    table = list(range(-(-(len(prompt) + max_tokens) // runner.block_size)))
    out = [int(runner.prefill(PrefillInput([prompt], [0], [table]))[0].argmax())]
    while len(out) < max_tokens:
        position = len(prompt) + len(out) - 1
        out.append(int(runner.decode(DecodeInput([out[-1]], [position], [table]))[0].argmax()))
    return out


@pytest.fixture(scope="module")
def expected(runner, prompts) -> list[list[int]]:
    return [sequential(runner, p, n) for p, n in zip(prompts, MAX_TOKENS)]


@pytest.fixture(scope="module")
def growing() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, n).tolist() for n in GROWING_LENS]


@pytest.fixture(scope="module")
def growing_expected(runner, growing) -> list[list[int]]:
    return [sequential(runner, p, GROWING_TOKENS) for p in growing]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def make_llm(policy: str, profile, **kw) -> LLM:
    extra = {"profile": profile} if policy == "nexus" else {}
    return LLM("tiny", policy=policy, device="cpu", **extra, **kw)


def assert_all_blocks_free(llm: LLM | AsyncLLM) -> None:
    core = llm.core
    deadline = time.monotonic() + 5
    while core.stats()["free_blocks"] != core.scheduler.bm.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.stats()["free_blocks"] == core.scheduler.bm.num_blocks


# -- same tokens as sequential generation ------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_matches_sequential_greedy(policy, profile, prompts, expected):
    llm = make_llm(policy, profile, **SMALL_BUDGETS)
    outs = llm.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert [o.token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert all(o.metrics.success and len(o.metrics.token_times_s) == len(o.token_ids) for o in outs)
    assert llm.stats()["running"] == llm.stats()["waiting"] == 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("policy", POLICIES)
def test_kv_shortage_preempts_and_output_is_unchanged(policy, profile, growing, growing_expected):
    # 8 blocks of 16 tokens; every request ends at 2-4 blocks, all together need 20.
    llm = make_llm(policy, profile, num_kv_blocks=8, **SMALL_BUDGETS)
    outs = llm.generate(growing, greedy(GROWING_TOKENS))
    assert llm.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == growing_expected
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("policy", ["chunked", "static:64"])
def test_seeded_sampling_survives_preemption(policy, profile, growing):
    params = [SamplingParams(max_tokens=GROWING_TOKENS, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(len(growing))]
    roomy = make_llm(policy, profile).generate(growing, params)
    tight = make_llm(policy, profile, num_kv_blocks=8, **SMALL_BUDGETS)
    outs = tight.generate(growing, params)
    assert tight.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]


def test_two_loop_policy_counts_split_switches_and_logs_steps(profile, prompts):
    llm = make_llm("nexus", profile, step_log=True, online_update=True, **SMALL_BUDGETS)
    llm.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    records = llm.core.step_records()
    assert {r.kind for r in records} == {"prefill", "decode"}
    assert {r.loop for r in records} == {"prefill", "decode"}
    total = profile.gpu["sm_count"]
    allowed = set(profile.split_sms) | {total}
    assert all(r.sms in allowed for r in records if r.kind == "prefill")
    assert all(total - r.sms in allowed | {0} for r in records if r.kind == "decode")
    assert sum(r.prefill_tokens for r in records) == sum(PROMPT_LENS)
    # Each time queued prompts appear and drain, the controller leaves and re-enters the all-decode split.
    assert llm.stats()["split_switches"] >= 1
    assert llm.core.ctx.latency_model.recent_decode_ms_ is not None  # the controller's step times were fed
    fed = [r for r in records if r.predicted_ms is not None]
    assert fed and all(r.cycle_ms > 0 for r in fed)  # kernel time and the loop's cycle, every two-loop step
    # A prefill step records the sequences the decode loop was running at its launch: only after a decode step.
    beside = [r for r in records if r.kind == "prefill" and r.beside_decode]
    first_decode = min(r.start_ms for r in records if r.kind == "decode")
    assert beside and all(r.start_ms > first_decode and r.beside_decode <= len(prompts) for r in beside)
    assert all(r.beside_decode == 0 for r in records if r.kind == "decode")


# -- text, stop strings, streaming -------------------------------------------------------------

def test_stop_string_cuts_the_text(profile, prompts):
    llm = make_llm("chunked", profile)
    full = llm.generate(prompts[1], greedy(20))[0]
    stop = full.text[6:8]
    cut = llm.generate(prompts[1], greedy(20, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_async_generate_streams_one_output_per_token(profile, prompts, expected):
    engine = AsyncLLM("tiny", policy="static:64", device="cpu")
    engine.start()

    async def run(i: int) -> list:
        return [out async for out in engine.generate(f"r{i}", prompts[i], greedy(MAX_TOKENS[i]))]

    async def main() -> list[list]:
        return await asyncio.gather(*(run(i) for i in range(len(prompts))))

    try:
        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for outs, want in zip(streams, expected):
        assert [o.token_id for o in outs] == want
        assert [o.finished for o in outs] == [False] * (len(want) - 1) + [True]
        assert outs[-1].finish_reason == "length" and outs[-1].metrics.output_tokens == len(want)
    text = engine.tokenizer.decode(expected[2])
    assert "".join(o.text for o in streams[2]) == text


# -- aborts and failures -----------------------------------------------------------------------

def test_abort_returns_blocks(prompts):
    engine = AsyncLLM("tiny", policy="static:64", device="cpu", max_num_seqs=1, num_kv_blocks=64)
    engine.start()

    async def main() -> None:
        running = engine.generate("running", prompts[3], greedy(400))
        got = [await running.__anext__() for _ in range(3)]  # it holds blocks and decodes
        assert not got[-1].finished
        waiting = asyncio.ensure_future(_drain(engine.generate("waiting", prompts[1], greedy(10))))
        while engine.stats()["waiting"] < 1:  # max_num_seqs=1 keeps it queued
            await asyncio.sleep(0.005)
        waiting.cancel()  # the consumer leaves: generate's clean-up aborts it
        await asyncio.gather(waiting, return_exceptions=True)
        await running.aclose()
        assert engine.stats()["waiting"] == 0

    try:
        asyncio.run(main())
        assert_all_blocks_free(engine)
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


async def _drain(stream) -> list:
    return [out async for out in stream]


@pytest.mark.parametrize("policy", POLICIES)
def test_failing_request_fails_alone(policy, profile, prompts, expected, monkeypatch):
    real = sampling.sample

    def flaky(logits, params, steps, *history):
        # The marked request raises from its third token on, in whatever batch it rides.
        if any(p.seed == 13 and s >= 2 for p, s in zip(params, steps)):
            raise RuntimeError("injected sampler failure")
        return real(logits, params, steps, *history)

    monkeypatch.setattr(sampling, "sample", flaky)
    llm = make_llm(policy, profile, **SMALL_BUDGETS)
    params = [greedy(n) for n in MAX_TOKENS]
    params[2] = greedy(MAX_TOKENS[2], seed=13)
    outs = llm.generate(prompts, params)
    assert outs[2].finish_reason == "error" and "injected sampler failure" in outs[2].error
    assert outs[2].token_ids == expected[2][:2] and not outs[2].metrics.success
    others = [i for i in range(len(prompts)) if i != 2]
    assert [outs[i].token_ids for i in others] == [expected[i] for i in others]
    assert_all_blocks_free(llm)
    again = llm.generate(prompts[:2], [greedy(n) for n in MAX_TOKENS[:2]])  # still serving
    assert [o.token_ids for o in again] == expected[:2]


def test_broken_loop_fails_requests_and_refuses_new_ones(profile, prompts, monkeypatch):
    llm = make_llm("prefill-first", profile)

    def broken(now):
        if llm.core.scheduler.num_unfinished:  # once there is work
            raise AssertionError("scheduler bug")

    monkeypatch.setattr(llm.core.scheduler, "schedule_step", broken)
    outs = llm.generate(prompts[:2], greedy(4))
    assert [o.finish_reason for o in outs] == ["error", "error"]
    assert "scheduler bug" in outs[0].error
    assert "scheduler bug" in llm.stats()["failed"]  # what the server's /health reports
    with pytest.raises(EngineError, match="internal error"):
        llm.generate(prompts[:1], greedy(4))


def test_bad_requests_are_refused(profile):
    llm = make_llm("chunked", profile)
    with pytest.raises(ValueError, match="no room for output"):
        llm.generate([[1] * 1024], greedy(4))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 10_000]], greedy(4))
    with pytest.raises(ValueError, match="KV blocks"):
        make_llm("chunked", profile, num_kv_blocks=2).generate([[1] * 40], greedy(4))


# -- configuration -----------------------------------------------------------------------------

def test_nexus_without_a_profile_refuses_on_a_cpu():
    with pytest.raises(EngineError, match="needs a latency profile.*synthetic_profile"):
        LLM("tiny", policy="nexus", device="cpu")


def test_nexus_names_the_command_that_makes_the_missing_profile(monkeypatch, tmp_path):
    gpu = DeviceInfo(0, "Fake GPU", "fake-gpu", 132, 80 << 30, (9, 0), "x", "x")
    monkeypatch.setattr("nexus_tune.core.device.identify", lambda index=0: gpu)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineError, match=r"profiles/fake-gpu/tiny\.json.*nexus-tune profile --model tiny"):
        load_profile(None, "tiny", torch.device("cuda"))


def test_unknown_policy_and_split_are_clear_errors():
    with pytest.raises(EngineError, match="unknown policy"):
        LLM("tiny", policy="fastest", device="cpu")
    with pytest.raises(EngineError, match="static needs a prefill SM count"):
        LLM("tiny", policy="static:", device="cpu")


# -- on a GPU: real green-context splits, graphs per side ---------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="green-context splits and CUDA graphs need an NVIDIA GPU")
@pytest.mark.parametrize("policy", POLICIES)
def test_policies_on_real_splits_match_sequential_greedy_on_a_gpu(policy, profile, prompts):
    """The loops on the GPU (two streams on disjoint SMs for the two-loop policies, graphs per side
    with GEMMs sized for it, tokens handed to the next step on the device) give the greedy tokens of
    one request at a time run eagerly; float32, so no bf16 near-tie can flip a token."""
    runner = ModelRunner("tiny", device="cuda", dtype=torch.float32, num_kv_blocks=64)
    want = [sequential(runner, p, n) for p, n in zip(prompts, MAX_TOKENS)]
    del runner
    extra = {"profile": profile} if policy == "nexus" else {}
    with LLM("tiny", policy=policy, device="cuda", dtype=torch.float32, step_log=True, **extra,
             **SMALL_BUDGETS) as llm:
        outs = llm.generate(prompts, [greedy(n) for n in MAX_TOKENS])
        assert [o.token_ids for o in outs] == want
        steps = llm.core.step_records()
        if llm.core.scheduler.two_loops:
            assert llm.core.table.backend == "green-contexts"
            assert any(s.kind == "decode" and s.sms < llm.core.placement.total_sms for s in steps)
        assert llm.core.graph_report, "graphs were captured"
        assert_all_blocks_free(llm)


def test_stats_explain_the_controllers_last_decision(profile, prompts):
    """What /metrics shows of nexus (nexus_tune/engine/server.py): the split, each side's predicted step, the TBT
    allowance and the observed decode cycle; before the first decision too."""
    llm = make_llm("nexus", profile, online_update=True, **SMALL_BUDGETS)
    assert llm.stats()["total_blocks"] == llm.core.scheduler.bm.num_blocks
    assert {"predicted_prefill_ms", "predicted_decode_ms", "recent_decode_ms"} <= set(llm.stats())
    llm.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    stats = llm.stats()
    assert stats["recent_decode_ms"] > 0 and stats["tbt_allowance_ms"] is not None
    assert make_llm("chunked", profile).stats().keys().isdisjoint({"predicted_decode_ms"})
