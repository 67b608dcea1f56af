"""Sampling behaviour and the stop check (statistical checks use fixed seeds and wide margins)."""
from __future__ import annotations

import pytest
import torch

import nexus_tune.engine.sampling as sampling_module
from nexus_tune.engine.sampling import StopDecision, TokenLogprobs, _penalize, check_stop, logprobs, sample
from nexus_tune.core.sequence import SamplingParams


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    out = sample(logits, [SamplingParams(temperature=0)] * 4, [0] * 4)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_is_greedy():
    logits = _logits()
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 4, [0] * 4)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_and_random_rows_mix():
    logits = _logits()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 2
    out = sample(logits, params, [0] * 4)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    logits = _logits(rows=3)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    draws = [sample(logits[:1], [seeded], [step]).item() for step in range(20)]
    torch.manual_seed(99)  # the global generator must not matter to a seeded request
    again = [sample(logits, [seeded, SamplingParams(), SamplingParams()], [step, 0, 0])[0].item()
             for step in range(20)]
    assert draws == again
    other = [sample(logits[:1], [SamplingParams(temperature=1.0, seed=4321)], [s]).item() for s in range(20)]
    assert draws != other
    assert len(set(draws)) > 1  # the step changes the noise


def test_temperature_follows_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=0.5)] * 4000, [0] * 4000)
    freq = torch.bincount(out, minlength=4).float() / 4000
    torch.testing.assert_close(freq, (logits[0] / 0.5).softmax(-1), atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None].repeat(3000, 1)
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(top_p=0.7)] * 3000, [0] * 3000)
    assert set(out.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.75: exactly the top two
    freq = torch.bincount(out, minlength=4).float() / 3000
    assert abs(freq[0].item() - 2 / 3) < 0.04  # renormalised 0.5 / 0.75
    out = sample(logits[:500], [SamplingParams(top_p=0.4)] * 500, [0] * 500)
    assert set(out.tolist()) == {0}


def test_top_k_restricts_to_k_tokens():
    logits = _logits(rows=1, vocab=100)[0:1].repeat(2000, 1)
    torch.manual_seed(0)
    out = sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 2000, [0] * 2000)
    assert set(out.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_huge_top_k_means_no_filter():
    logits = _logits()
    out = sample(logits, [SamplingParams(temperature=1.0, top_k=2**80, seed=5)] * 4, [0] * 4)
    assert torch.equal(out, sample(logits, [SamplingParams(temperature=1.0, seed=5)] * 4, [0] * 4))


# -- penalties: a reference written out per token, against the batched scatter_add version ----
def _reference_penalties(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    row = row.clone()
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def test_penalties_match_a_per_token_reference_and_spare_other_rows():
    vocab = 30
    logits = _logits(rows=4, vocab=vocab)
    prompts = [[1, 2, 3], [4, 5], [6, 6, 7], [8]]
    outputs = [[2, 2, 9], [], [7, 7, 7, 11], [8, 12]]
    params = [SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=0.3),
              SamplingParams(temperature=0),  # no penalty: its row must come out exactly as it went in
              SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=-0.4),
              SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=1.3)]
    history = [p + o for p, o in zip(prompts, outputs)]
    steps = [len(o) for o in outputs]
    want = torch.stack([_reference_penalties(logits[i], params[i], prompts[i], outputs[i]) for i in range(4)])
    before = logits.clone()
    torch.testing.assert_close(_penalize(logits, [0, 1, 2, 3], params, steps, history), want)
    torch.testing.assert_close(_penalize(logits, [0, 2], params, steps, history)[[0, 2]], want[[0, 2]])
    out = sample(logits, params, steps, history)
    assert torch.equal(logits, before)  # the caller's logits (what logprobs read) are untouched
    assert torch.equal(out, want.argmax(-1))
    # Row 0 said token 2 twice: lifted just above the best other token, the penalty must sink it.
    boosted = logits[:1].clone()
    boosted[0, 2] = boosted[0].max() + 1.0
    assert sample(boosted, params[:1], steps[:1], history[:1]).item() != 2
    assert sample(boosted, [SamplingParams(temperature=0)], [3]).item() == 2


def test_a_history_token_still_on_the_device_counts_like_one_on_the_host():
    logits = _logits(rows=2, vocab=30)
    params = [SamplingParams(temperature=0, frequency_penalty=1.0, repetition_penalty=1.5)] * 2
    full = [[1, 2, 5, 5, 7], [3, 9, 9]]
    pending = torch.tensor([7, 9])  # the newest output of each row, sampled by a step still in flight
    want = _penalize(logits, [0, 1], params, [3, 2], full)
    got = _penalize(logits, [0, 1], params, [3, 2], [[1, 2, 5, 5, -1], [3, 9, -1]], pending)
    torch.testing.assert_close(got, want)
    assert not torch.equal(want, _penalize(logits, [0, 1], params, [2, 1], [[1, 2, 5, 5], [3, 9]]))


def test_frequency_penalty_changes_the_sampled_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    history = [[3, 0, 0, 0]] * 4000  # prompt [3], output [0, 0, 0]
    torch.manual_seed(0)
    params = [SamplingParams(temperature=1.0, frequency_penalty=1.0)] * 4000
    out = sample(logits, params, [3] * 4000, history)
    freq = torch.bincount(out, minlength=4).float() / 4000
    want = (logits[0] - torch.tensor([3.0, 0, 0, 0])).softmax(-1)
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


def test_penalties_need_the_history():
    with pytest.raises(ValueError, match="token_ids"):
        sample(_logits(rows=1), [SamplingParams(presence_penalty=1.0)], [0])


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
                                         ("repetition_penalty", 0.0), ("logprobs", 21), ("logprobs", True)])
def test_bad_new_params_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# -- logprobs ----------------------------------------------------------------------------------
def test_logprobs_are_the_float32_log_softmax_of_the_raw_logits():
    logits = _logits(rows=3, vocab=40).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.7, logprobs=5, frequency_penalty=2.0), SamplingParams(),
              SamplingParams(temperature=0, logprobs=0)]
    ids = sample(logits, params, [1, 0, 0], [[1, 2], [3], [4]])
    rows = logprobs(logits, ids, params).rows()
    reference = logits.float().log_softmax(-1)  # before temperature and penalties
    assert rows[1] is None
    for i in (0, 2):
        assert rows[i].logprob == pytest.approx(reference[i, ids[i]].item(), abs=1e-6)
    assert rows[2].top == []
    top = rows[0].top
    assert len(top) == 5 and [t for t, _ in top] == reference[0].topk(5).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for token, lp in top:
        assert lp == pytest.approx(reference[0, token].item(), abs=1e-6)


def test_no_logprobs_asked_means_no_work():
    logits = _logits()
    assert logprobs(logits, logits.argmax(-1), [SamplingParams()] * 4) is None


def test_greedy_token_is_the_top_logprob():
    logits = _logits()
    params = [SamplingParams(temperature=0, logprobs=3)] * 4
    ids = sample(logits, params, [0] * 4)
    for token, row in zip(ids.tolist(), logprobs(logits, ids, params).rows()):
        assert isinstance(row, TokenLogprobs) and row.top[0][0] == token and row.top[0][1] == row.logprob


def test_stop_on_eos_unless_ignored():
    p = SamplingParams(max_tokens=10)
    assert check_stop([5, 2], "ab", 0, p, {2}) == StopDecision("stop", 2)
    assert check_stop([5, 2], "ab", 0, SamplingParams(max_tokens=10, ignore_eos=True), {2}) is None


def test_stop_on_max_tokens():
    p = SamplingParams(max_tokens=3)
    assert check_stop([5, 6], "ab", 1, p, {2}) is None
    assert check_stop([5, 6, 7], "abc", 1, p, {2}) == StopDecision("length", 3)


def test_stop_string_cuts_the_text_even_across_tokens():
    p = SamplingParams(max_tokens=100, stop=["END", "\n\n"])
    assert check_stop([1, 2], "hello EN", 2, p, set()) is None
    # "END" completed by a token that added "D!" : the text is cut where the stop string begins.
    assert check_stop([1, 2, 3], "hello END!", 2, p, set()) == StopDecision("stop", 6)
    assert check_stop([1, 2, 3, 4], "a\n\nb", 2, p, set()) == StopDecision("stop", 1)


# -- through the engine: the loop must hand sample() each row's history and deliver logprobs --------
# A spy on engine.sampling.sample records the logits and histories the loop passes; the reference
# is then computed from those logits in float32, independently of the engine's own arithmetic.
PROMPT = [256, *b"The quick brown fox"]  # the tiny model's byte tokenizer: BOS, then bytes


@pytest.fixture(scope="module")
def llm(one_intra_op_thread):
    from nexus_tune.engine.llm import LLM

    with LLM("tiny", policy="chunked", device="cpu") as engine:
        yield engine


@pytest.fixture
def spy(monkeypatch) -> list[tuple[torch.Tensor, list[list[int]] | None]]:
    calls = []
    real = sampling_module.sample

    def recording(logits, params, steps, token_ids=None, pending_ids=None):
        history = None
        if token_ids is not None:  # as the rows' full histories: a token still on the device filled in
            pending = pending_ids.tolist() if pending_ids is not None else []
            history = [[pending[row] if t < 0 else t for t in ids] for row, ids in enumerate(token_ids)]
        calls.append((logits.float().clone(), history))
        return real(logits, params, steps, token_ids, pending_ids)

    monkeypatch.setattr(sampling_module, "sample", recording)
    return calls


def test_the_engine_returns_the_logprobs_of_the_logits_it_sampled_from(llm, spy):
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=7, logprobs=4, ignore_eos=True)
    out = llm.generate([PROMPT], params)[0]
    assert len(spy) == len(out.token_ids) == len(out.logprobs) == 8
    for (logits, _), token, lp in zip(spy, out.token_ids, out.logprobs):
        reference = logits[0].log_softmax(-1)
        assert lp.logprob == pytest.approx(reference[token].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == reference.topk(4).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(reference.topk(4).values.tolist(), abs=1e-5)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].logprobs is None


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.5}, {"presence_penalty": 2.0},
                                     {"repetition_penalty": 2.0},
                                     {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}])
def test_engine_penalties_follow_the_reference_and_change_the_tokens(llm, spy, penalty):
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **penalty)
    out = llm.generate([PROMPT], params)[0].token_ids
    assert len(spy) == len(out)
    for step, (logits, history) in enumerate(spy):
        assert history == [PROMPT + out[:step]]  # what the loop must pass: prompt + outputs so far
        assert out[step] == _reference_penalties(logits[0], params, PROMPT, out[:step]).argmax().item()
    unpenalized = llm.generate([PROMPT], plain)[0].token_ids
    assert out != unpenalized
    # In one batch, the penalized row leaves its neighbour alone.
    both = llm.generate([PROMPT, PROMPT], [params, plain])
    assert [o.token_ids for o in both] == [out, unpenalized]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_nothing_waits_for_the_device_and_results_match_the_cpu():
    logits = _logits(rows=5, vocab=1000).cuda()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=3),
              SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5, logprobs=5),
              SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=0),
              SamplingParams(temperature=0.7, seed=4, frequency_penalty=0.3)]
    history = [[1, 2], [3], [4, 5, 5, -1], [6, 7, -1], [8, 9]]  # -1: the output token still on the device
    steps = [0, 0, 3, 1, 1]
    pending = torch.tensor([0, 0, 5, 7, 0], device="cuda")
    sample(logits, params, steps, history, pending)  # warm-up: pinned buffers, generators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host wait on the GPU raises
    try:
        ids = sample(logits, params, steps, history, pending)
        lps = logprobs(logits, ids, params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    on_host = [[1, 2], [3], [4, 5, 5, 5], [6, 7, 7], [8, 9]]
    want = sample(logits.cpu(), params, steps, on_host)
    assert ids.cpu()[[0, 2, 3]].tolist() == want[[0, 2, 3]].tolist()  # the deterministic rows
    rows, cpu_rows = lps.rows(), logprobs(logits.cpu(), ids.cpu(), params).rows()
    assert [r is None for r in rows] == [True, True, False, False, True]
    for got, ref in zip(rows[2:4], cpu_rows[2:4]):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in ref.top]
