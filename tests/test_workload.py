import json

import numpy as np
import pytest

from nexus_tune.core.workload import MIXED_SHAREGPT_SHARE, PAPER_STATS, arrival_times, make_trace, synthetic_lengths


@pytest.mark.parametrize("name", list(PAPER_STATS))
def test_synthetic_quantiles_match_paper(name):
    prompt, output = synthetic_lengths(name, 200_000, np.random.default_rng(0))
    for sample, stats in zip((prompt, output), PAPER_STATS[name]):
        got = [sample.mean(), *np.percentile(sample, [50, 95, 99])]
        want = [stats.mean, stats.p50, stats.p95, stats.p99]
        assert got == pytest.approx(want, rel=0.05)
        assert sample.min() >= 1


def test_mixed_is_sharegpt_and_longdata():
    prompt, output = synthetic_lengths("mixed", 200_000, np.random.default_rng(1))
    share, long = PAPER_STATS["sharegpt-synth"], PAPER_STATS["longdata"]
    p = MIXED_SHAREGPT_SHARE
    assert prompt.mean() == pytest.approx(p * share[0].mean + (1 - p) * long[0].mean, rel=0.05)
    assert output.mean() == pytest.approx(p * share[1].mean + (1 - p) * long[1].mean, rel=0.05)
    # ShareGPT prompts never exceed ~1.5k tokens and Long Data ones rarely fall below 2.5k
    assert np.mean(prompt < 2000) == pytest.approx(p, abs=0.02)


@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (10.0, 0.25), (2.0, 4.0)])
def test_arrivals_have_rate_and_burstiness(rate, burstiness):
    gaps = np.diff(arrival_times(100_000, rate, burstiness, np.random.default_rng(2)))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # gamma with shape k has CV 1/sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.03)


def test_infinite_rate_sends_everything_at_once():
    assert all(r.arrival_s == 0.0 for r in make_trace("random", 10, float("inf")))


def test_trace_same_requests_at_every_rate():
    slow, fast = make_trace("mixed", 50, 1.0, seed=3), make_trace("mixed", 50, 4.0, seed=3)
    assert [(r.prompt_tokens, r.output_tokens) for r in slow] == [(r.prompt_tokens, r.output_tokens) for r in fast]
    assert fast[-1].arrival_s == pytest.approx(slow[-1].arrival_s / 4)
    assert make_trace("mixed", 50, 1.0, seed=4)[1].prompt_tokens != slow[1].prompt_tokens


def test_random_dataset_lengths():
    trace = make_trace("random", 5, 1.0, random_input_len=300, random_output_len=7)
    assert {(r.prompt_tokens, r.output_tokens) for r in trace} == {(300, 7)}
    assert [r.request_id for r in trace] == ["0", "1", "2", "3", "4"]


def test_sharegpt_file(tmp_path):
    def conv(human, gpt):
        return {"id": human[:5], "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}

    data = [
        conv("Tell me a story about a brave little robot.", "Once upon a time, a robot named Bolt saved the day."),
        conv("hi", "Hello there, how can I help you today?"),  # prompt too short: dropped
        conv("What is the capital of France, please?", "Paris is the capital of France."),
        {"id": "lonely", "conversations": [{"from": "human", "value": "no reply here at all"}]},  # no reply: dropped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    trace = make_trace("sharegpt", 6, 2.0, path=str(path))
    assert len(trace) == 6
    assert {r.prompt for r in trace} == {data[0]["conversations"][0]["value"], data[2]["conversations"][0]["value"]}
    story = next(r for r in trace if r.prompt.startswith("Tell"))
    assert story.prompt_tokens == 10 and story.output_tokens == 13  # words and punctuation marks
    # a file path given as the workload name reads as sharegpt
    assert [r.prompt for r in make_trace(str(path), 6, 2.0)] == [r.prompt for r in trace]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        make_trace("nope", 10, 1.0)
    with pytest.raises(ValueError, match="dataset-path"):
        make_trace("sharegpt", 10, 1.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_trace("sharegpt", 10, 1.0, path=str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        make_trace("sharegpt", 10, 1.0, path=str(empty))
    with pytest.raises(ValueError, match="burstiness"):
        make_trace("mixed", 10, 1.0, burstiness=0)
