"""Property-based fuzzing of the HTTP API (nexus_tune/engine/server.py) over the fake engine.

Thousands of bodies, from near-valid requests with one odd value to random bytes, must never
make a 5xx; every 4xx must carry OpenAI's error shape; a stream that got its 200 must end with
[DONE] and no error (validation happens before the 200); and the engine must never have to
refuse a request the server let through (it checks what the real engine checks).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from nexus_tune.engine.server import build_app
from server_helpers import FakeEngine

MODEL = "fuzz-model"
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Strings JSON can carry (as escapes) and UTF-8 cannot; hypothesis's text() never makes them.
LONE_SURROGATES = ["\ud800", "a\udfffb", "\udbff\udbff"]
# Any JSON value, with what breaks naive code: huge ints, NaN and infinities (Python's json reads
# NaN/Infinity, so a client can send them), lone surrogates.
HUGE = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
SCALARS = (st.none() | st.booleans() | st.integers(-300, 300) | HUGE | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(LONE_SURROGATES))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=8)


def mostly(valid: st.SearchStrategy, *edges: object) -> st.SearchStrategy:
    """Values in the field's range most of the time, else one of its edges (or just past them)."""
    return st.tuples(st.integers(0, 9), valid, st.sampled_from(edges)).map(lambda t: t[2] if t[0] == 9 else t[1])


SMALL_INT = mostly(st.integers(1, 40), 0, -1, 48, 64, 2**63)
TEXT = mostly(st.text(max_size=40), *LONE_SURROGATES)
# Mostly valid values (and the edges of each range), so that many requests reach the engine.
COMMON = {
    "max_tokens": st.none() | SMALL_INT,
    "temperature": mostly(st.floats(0.0, 2.0), -0.1, 2.01, math.nan, math.inf),
    "top_p": mostly(st.floats(0.01, 1.0), 0.0, 1.5, -math.inf),
    "top_k": mostly(st.integers(-1, 300), -2, 2**31, 2**63, 2**64),
    "seed": mostly(st.integers(-(2**63), 2**63 - 1), 2**63, -(2**63) - 1, 1.5),
    "stop": st.none() | TEXT | st.lists(TEXT, max_size=3),
    "ignore_eos": st.booleans(),
    "presence_penalty": mostly(st.floats(-2.0, 2.0), 2.5, math.nan),
    "frequency_penalty": mostly(st.floats(-2.0, 2.0), -2.5, math.inf),
    "repetition_penalty": mostly(st.floats(0.5, 2.0), 0.0, -1.0, 11.0),
    "n": mostly(st.integers(1, 3), 0, 129, 2**63),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": TEXT,
}
COMPLETION_ONLY = {
    "echo": st.booleans(),
    "logprobs": st.none() | mostly(st.integers(0, 20), -1, 21, True),
    "suffix": mostly(st.sampled_from([None, ""]), "tail"),
    "best_of": mostly(st.none(), 0, 1, 2),
}
CHAT_ONLY = {
    "max_completion_tokens": st.none() | SMALL_INT,
    "logprobs": st.none() | st.booleans(),
    "top_logprobs": st.none() | mostly(st.integers(0, 20), -1, 21),
    "response_format": st.fixed_dictionaries({"type": mostly(st.just("text"), "json_object", "json_schema")}),
}
MODEL_NAME = mostly(st.just(MODEL), "gpt-4o", "")
PROMPT = mostly(st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 258), min_size=1, max_size=40),
               "", [], [259], [-1], "x" * 48, ["a", "b"], [[1, 2]])
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]),
     "content": TEXT | st.lists(PART, max_size=2)},
    optional={"name": TEXT})
# Fields a mutation may spoil: every known one, and a few that are not ours.
ODD_KEYS = ["model", "prompt", "messages", "stream", *COMMON, *COMPLETION_ONLY, *CHAT_ONLY, "logit_bias", "tools", "x"]


@st.composite
def spoiled(draw: st.DrawFn, valid: st.SearchStrategy) -> dict:
    """A request body, half the time with one or two fields set to any JSON value at all."""
    body = draw(valid)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        body[draw(st.sampled_from(ODD_KEYS) | TEXT)] = draw(JSON)
    return body


COMPLETION = spoiled(st.fixed_dictionaries({"model": MODEL_NAME, "prompt": PROMPT, "stream": st.booleans()},
                                           optional={**COMMON, **COMPLETION_ONLY}))
CHAT = spoiled(st.fixed_dictionaries({"model": MODEL_NAME, "messages": st.lists(MESSAGE, min_size=1, max_size=3),
                                      "stream": st.booleans()},
                                     optional={**COMMON, **CHAT_ONLY}))


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[FakeEngine, TestClient]]:
    engine = FakeEngine(scripted=False, max_request_tokens=48)  # a KV cache smaller than the context
    with TestClient(build_app(engine, MODEL)) as client:
        yield engine, client
    assert not engine.refused, f"the server let through what the engine refused: {engine.refused[:3]}"
    assert not engine.blocks  # every request ended


def check(response, stream: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif stream:
        # SSE ends lines at CR or LF only; str.splitlines would also split at U+0085 and U+2028.
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any("error" in json.loads(e) for e in events[:-1]), response.text


def send(client: TestClient, path: str, body: object) -> None:
    content = json.dumps(body)  # NaN and Infinity go out as such
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    check(response, isinstance(body, dict) and body.get("stream") is True)


@given(body=COMPLETION)
@settings(FUZZ, max_examples=900)
def test_fuzzed_completions(fuzzed, body):
    send(fuzzed[1], "/v1/completions", body)


@given(body=CHAT)
@settings(FUZZ, max_examples=900)
def test_fuzzed_chat_completions(fuzzed, body):
    send(fuzzed[1], "/v1/chat/completions", body)


@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/x", "/v2/x"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", None]),
       content=st.binary(max_size=60) | JSON.map(lambda v: json.dumps(v).encode()))
@settings(FUZZ, max_examples=400)
def test_fuzzed_raw_requests(fuzzed, method, path, content_type, content):
    headers = {"Content-Type": content_type} if content_type else {}
    check(fuzzed[1].request(method, path, content=content, headers=headers), stream=False)
