"""The official `openai` client against the server: every parameter it sends for completions and
chat works, parses into the client's own types, and (on the tiny engine) changes what it should.

Over the fake engine (tests/server_helpers.py) the shapes; over the tiny model in-process the
numbers: logprobs through the API equal the offline engine's, penalties change the tokens.
"""
from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from nexus_tune.engine.server import build_app
from nexus_tune.core.sequence import SamplingParams
from server_helpers import FakeEngine, ThreadServer

MODEL = "fake-model"


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60.0, max_retries=0)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeEngine, openai.OpenAI]]:
    engine = FakeEngine()
    with ThreadServer(build_app(engine, MODEL)) as url:
        yield engine, client_for(url)


def test_completions_with_every_parameter(fake):
    engine, client = fake
    out = client.completions.create(
        model=MODEL, prompt="abcdef", max_tokens=4, temperature=0.7, top_p=0.9, seed=5, stop=["zz"], n=2,
        best_of=2, echo=True, presence_penalty=0.5, frequency_penalty=0.25, user="me", suffix=None,
        extra_body={"top_k": 8, "repetition_penalty": 1.1, "ignore_eos": True})
    assert [c.text for c in out.choices] == ["abcdefabcd"] * 2 and [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == 6
    params = [p for _, p in engine.calls[-2:]]
    assert [p.seed for p in params] == [5, 6]
    p = params[0]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (4, 0.7, 0.9, 8, ["zz"])
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.ignore_eos) == (0.5, 0.25, 1.1, True)

    lp = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2).choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"] and lp.token_logprobs == [-0.25] * 3 and lp.text_offset == [0, 1, 2]
    assert lp.top_logprobs[1] == {"b": -0.25, "c": -0.5}


def test_completion_stream_with_choices_and_logprobs(fake):
    _, client = fake
    chunks = list(client.completions.create(model=MODEL, prompt="xyz", max_tokens=3, n=2, logprobs=1, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == "xyz"
        assert [c.logprobs.text_offset for c in mine] == [[0], [1], [2]]
        assert mine[-1].finish_reason == "length"


def test_chat_with_every_parameter(fake):
    engine, client = fake
    messages = [{"role": "developer", "content": "be kind"}, {"role": "user", "content": "hi", "name": "bo"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=3, temperature=0.5, top_p=0.8, seed=1, stop="qq",
        n=2, presence_penalty=-0.5, frequency_penalty=1.0, logprobs=True, top_logprobs=3, user="me",
        response_format={"type": "text"}, stream=False)
    assert [c.message.content for c in out.choices] == ["<sy"] * 2
    first = out.choices[0].logprobs.content[0]
    assert first.token == "<" and first.logprob == -0.25 and first.bytes == [60]
    assert [t.token for t in first.top_logprobs] == ["<", "=", ">"]
    prompt, params = engine.calls[-1]
    assert engine.tokenizer.decode(prompt) == "<system>be kind\n<user=bo>hi\n<assistant>"
    assert (params.presence_penalty, params.frequency_penalty, params.logprobs, params.seed) == (-0.5, 1.0, 3, 2)

    stream = client.chat.completions.create(model=MODEL, messages=messages[1:], max_tokens=2, n=2, stream=True,
                                            logprobs=True)
    chunks = [c.choices[0] for c in stream]
    assert {c.index for c in chunks} == {0, 1}
    assert [c.logprobs.content[0].token for c in chunks if c.logprobs] == ["<", "<", "u", "u"]


def test_models(fake):
    _, client = fake
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("someone-else/model")


@pytest.mark.parametrize("call,param", [
    (lambda c: c.completions.create(model=MODEL, prompt="x", suffix="after"), "suffix"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", echo=True, logprobs=1), "echo"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", best_of=3), "best_of"),
    (lambda c: c.completions.create(model=MODEL, prompt="x", logit_bias={"5": 1}), "logit_bias"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         response_format={"type": "json_object"}), "response_format"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         top_logprobs=2), "top_logprobs"),
])
def test_what_the_engine_cannot_do_is_a_400_naming_it(fake, call, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(fake[1])
    assert info.value.param == param and info.value.type == "invalid_request_error"


# -- the tiny model, in-process ----------------------------------------------------------------
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny(one_intra_op_thread) -> Iterator[tuple[openai.OpenAI, object]]:
    from nexus_tune.engine.llm import LLM, AsyncLLM

    engine = AsyncLLM("tiny", policy="chunked", device="cpu")
    with ThreadServer(build_app(engine, "tiny")) as url, LLM("tiny", policy="chunked", device="cpu") as offline:
        yield client_for(url), offline


def test_tiny_logprobs_through_the_api_are_the_engines(tiny):
    client, offline = tiny
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, logprobs=3, ignore_eos=True)
    want = offline.generate([PROMPT], params)[0]
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=11,
                                           logprobs=3, extra_body={"ignore_eos": True})
    lp = completion.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    for top, expected in zip(lp.top_logprobs, want.logprobs):
        # A dict of the alternatives plus the sampled token (alternatives that decode alike merge).
        assert max(top.values()) == pytest.approx(expected.top[0][1], abs=1e-5)
    assert "".join(lp.tokens) == completion.choices[0].text == want.text

    messages = [{"role": "user", "content": PROMPT}]
    ids = offline.tokenizer.apply_chat_template(messages, tokenize=True)
    want = offline.generate([ids], params)[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.8, seed=11,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    for entry, expected in zip(content, want.logprobs):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in expected.top], abs=1e-5)
        assert [t.token for t in entry.top_logprobs] == [offline.tokenizer.decode([t]) for t, _ in expected.top]


def test_tiny_frequency_penalty_changes_the_tokens(tiny):
    client, offline = tiny
    base = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0,
            "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**base).choices[0].text
    penalized = client.completions.create(**base, frequency_penalty=2.0).choices[0].text
    want = offline.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                     frequency_penalty=2.0))[0].text
    assert penalized == want != plain
    # Repeats are what the penalty pays for: the penalized text repeats its characters less.
    assert len(set(penalized)) > len(set(plain))
