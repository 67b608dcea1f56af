"""Sampling behaviour and the stop check (statistical checks use fixed seeds and wide margins)."""
from __future__ import annotations

import torch

from engine.sampling import StopDecision, check_stop, sample
from nexus_tune.sequence import SamplingParams


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
