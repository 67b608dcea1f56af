"""The OpenAI-compatible server (nexus_tune/engine/server.py).

Two layers: the request logic over a small fake engine that follows AsyncLLM's contract
(tests/server_helpers.py, served in-process by uvicorn in a thread; it can hold, fail and count
blocks on demand), then the real thing: `python -m nexus_tune serve --model tiny --device cpu`
in a subprocess.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from nexus_tune.engine.sampling import TokenLogprobs
from nexus_tune.engine.server import build_app
from nexus_tune.core.sequence import SamplingParams
from server_helpers import FakeEngine, ThreadServer, sse_events, wait_for

MODEL = "fake-model"
TIMEOUT = httpx.Timeout(10.0)


# -- helpers shared by both layers ---------------------------------------------------------
def metrics(base_url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels folded into the name), parsed by prometheus_client."""
    text = httpx.get(f"{base_url}/metrics", timeout=TIMEOUT).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    with ThreadServer(build_app(engine, MODEL, max_queue=2)) as url:
        yield engine, url
    assert engine.started and engine.stopped


@pytest.fixture
def engine(fake) -> Iterator[FakeEngine]:
    eng, url = fake
    eng.gate.clear()
    eng.aborted.clear()
    yield eng
    eng.gate.set()  # never leave a request held for the next test
    wait_for(lambda: not eng.blocks, what="the fake's requests to end")


@pytest.fixture
def url(fake, engine) -> str:
    return fake[1]


def post(url: str, path: str, body: dict | str, timeout: float = 10.0) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=timeout)


# -- request logic over the fake -----------------------------------------------------------
def test_completion_body_and_usage(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == "hellohe"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_completion_stream_matches_body_and_ends_with_usage_then_done(url):
    req = {"model": MODEL, "prompt": "stream me", "max_tokens": 6, "stream": True,
           "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    chunks = events[:-2]
    assert len(chunks) == 6  # one chunk per token
    assert "".join(c["choices"][0]["text"] for c in chunks) == "stream"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]


def test_stream_without_include_usage_has_no_usage_chunk(url):
    req = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, timeout=TIMEOUT) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])


def test_token_id_prompt(url, engine):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": [10, 11, 12], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    assert engine.calls[-1][0] == [10, 11, 12]


def test_chat_uses_the_template_and_streams_role_first(url, engine):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "<sys"}
    assert engine.tokenizer.decode(engine.calls[-1][0]) == "<system>be brief\n<user>hi\n<assistant>"

    req = {"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=TIMEOUT) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "<sys"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_sampling_parameters_reach_the_engine(url, engine):
    req = {"model": MODEL, "prompt": "abcd", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
           "top_k": 5, "seed": 7, "stop": "xy", "ignore_eos": True}
    assert post(url, "/v1/completions", req).status_code == 200
    params = engine.calls[-1][1]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (3, 0.5, 0.9, 5, 7)
    assert list(params.stop) == ["xy"] and params.ignore_eos is True
    # Without max_tokens the request may fill the context.
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "abcd"}).status_code == 200
    assert engine.calls[-1][1].max_tokens == FakeEngine.max_model_len - 4


def test_models_health(url):
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    cards = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()["data"]
    assert [c["id"] for c in cards] == [MODEL] and cards[0]["max_model_len"] == FakeEngine.max_model_len


def test_oversized_bodies_get_413_without_being_buffered(monkeypatch):
    from nexus_tune.engine import server

    monkeypatch.setattr(server, "MAX_BODY_BYTES", 1000)
    big = json.dumps({"model": MODEL, "prompt": "x" * 2000})
    with ThreadServer(build_app(FakeEngine(), MODEL)) as url:
        announced = post(url, "/v1/completions", big)  # Content-Length says it all
        streamed = httpx.post(f"{url}/v1/completions", content=iter([big[:600].encode(), big[600:].encode()]),
                              headers={"content-type": "application/json"}, timeout=TIMEOUT)  # chunked
        small = post(url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    for r in (announced, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert small.status_code == 200


def test_health_is_503_once_the_engine_has_failed(url, engine):
    engine.failed = "RuntimeError: loop died"
    try:
        r = httpx.get(f"{url}/health", timeout=TIMEOUT)
        assert r.status_code == 503 and "loop died" in r.json()["error"]
    finally:
        engine.failed = None
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


def test_openai_client(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=10.0, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="openai", max_tokens=6, temperature=0.0)
    assert out.choices[0].text == "openai" and out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "<user"
    assert chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="other", prompt="x", max_tokens=1)


BAD_REQUESTS = [
    # (body, param named in the error, words in the message)
    ('{"model": "fake-model", "prompt": ', None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ({"model": "gpt-4", "prompt": "x"}, "model", "does not exist"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2, "echo": True}, "echo", "echo with logprobs"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n", "greater than"),
    ({"model": MODEL, "prompt": "x", "n": 129}, "n", "less than"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", "greater than"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -5}, "max_tokens", "greater than"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, "max_tokens", "maximum context length"),
    ({"model": MODEL, "prompt": "x" * 64}, "prompt", "maximum context length"),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": [1, 999]}, "prompt", "vocabulary"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "one prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature", "less than"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "greater than"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", 1]}, "stop.1", "valid string"),
    ({"prompt": "x"}, "model", "required"),
]


@pytest.mark.parametrize("body,param,words", BAD_REQUESTS)
def test_bad_request_is_an_openai_400(url, body, param, words):
    r = post(url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "audio": 1}]}, "messages.0.audio"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.image_url"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [""]}, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "refuse"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
])
def test_bad_chat_request_is_an_openai_400(url, body, param):
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("prompt", ["fail now", "raise now"])
def test_engine_failure_fails_one_request_only(url, prompt):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 5})
    assert r.status_code == 500 and "engine" in r.json()["error"]["message"]
    req = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, timeout=TIMEOUT) as resp:
        events = sse_events(resp)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2}).status_code == 200
    assert metrics(url)['nexus_requests_total{finished_reason=error}'] >= 1


def test_stream_disconnect_aborts_and_frees_blocks(url, engine):
    assert metrics(url)["nexus_kv_free_blocks"] == FakeEngine.num_blocks
    req = {"model": MODEL, "prompt": "hold this stream", "max_tokens": 20, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{url}/v1/completions", json=req) as r:
        lines = r.iter_lines()  # keep it: a dropped line iterator closes the connection
        next(lines)  # the first token arrived; the engine now holds the request
        assert metrics(url)["nexus_kv_free_blocks"] == FakeEngine.num_blocks - 4
        assert not engine.aborted
    wait_for(lambda: metrics(url)["nexus_kv_free_blocks"] == FakeEngine.num_blocks, what="blocks back")
    assert engine.calls and len(engine.aborted) == 1
    assert metrics(url)["nexus_server_pending_requests"] == 0


def test_disconnect_aborts_every_choice(url, engine):
    req = {"model": MODEL, "prompt": "hold both", "max_tokens": 20, "n": 2, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{url}/v1/completions", json=req) as r:
        lines = r.iter_lines()
        next(lines)
        wait_for(lambda: len(engine.blocks) == 2, what="both choices running")
    wait_for(lambda: len(engine.aborted) == 2 and not engine.blocks, what="both aborted")
    assert metrics(url)["nexus_server_pending_requests"] == 0


def test_leaving_the_queue_frees_the_slot(url, engine):
    req = {"model": MODEL, "prompt": "queue me", "max_tokens": 5, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{url}/v1/completions", json=req):
        wait_for(lambda: metrics(url)["nexus_server_pending_requests"] == 1, what="the queued request")
    wait_for(lambda: metrics(url)["nexus_server_pending_requests"] == 0, what="the slot back")
    wait_for(lambda: len(engine.aborted) == 1, what="the abort")


def test_non_streaming_disconnect_aborts(url, engine):
    req = {"model": MODEL, "prompt": "hold it", "max_tokens": 20}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the engine holds the request
        httpx.post(f"{url}/v1/completions", json=req, timeout=httpx.Timeout(10.0, read=0.3))
    wait_for(lambda: len(engine.aborted) == 1, what="the abort")
    assert not engine.blocks


def test_overload_answers_503_and_accepted_requests_complete(url, engine):
    results = []

    def send():
        results.append(post(url, "/v1/completions", {"model": MODEL, "prompt": "queue me", "max_tokens": 3}))

    senders = [threading.Thread(target=send) for _ in range(2)]
    for t in senders:
        t.start()
    wait_for(lambda: metrics(url)["nexus_server_pending_requests"] == 2, what="two queued requests")
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "one too many", "max_tokens": 3})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    engine.gate.set()
    for t in senders:
        t.join(timeout=10)
    assert [x.status_code for x in results] == [200, 200]
    assert all(x.json()["choices"][0]["text"] == "que" for x in results)
    assert metrics(url)["nexus_requests_rejected_total"] >= 1


def test_metrics_parse_with_latency_histograms_and_engine_gauges(url):
    post(url, "/v1/completions", {"model": MODEL, "prompt": "measure", "max_tokens": 4})
    m = metrics(url)
    assert m["nexus_time_to_first_token_seconds_count"] >= 1
    assert m["nexus_inter_token_latency_seconds_count"] >= 3
    assert m["nexus_e2e_request_latency_seconds_count"] >= 1
    assert m["nexus_split_switches_total"] == 3
    for name in ("nexus_num_requests_running", "nexus_num_requests_waiting", "nexus_kv_cache_usage_perc"):
        assert name in m
    assert "nexus_prefill_sms" not in m  # the engine reports none: no made-up value


def test_n_choices_each_with_its_own_seed_and_index(url, engine):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 2, "n": 2, "seed": 10})
    assert r.status_code == 200
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == "ab" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] == 3
    assert [params.seed for _, params in engine.calls[-2:]] == [10, 11]
    # More choices than the queue takes at once (max_queue=2 here) could never be admitted.
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 2, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"

    req = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 3, "n": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=TIMEOUT) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    by_choice: dict[int, list[dict]] = {0: [], 1: []}
    for e in events[:-1]:
        (choice,) = e["choices"]
        by_choice[choice["index"]].append(choice)
    for chunks in by_choice.values():
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in chunks) == "<us"
        assert [c["finish_reason"] for c in chunks[1:]] == [None, None, "length"]


def test_echo_prepends_the_prompt(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hey", "max_tokens": 2, "echo": True})
    assert r.json()["choices"][0]["text"] == "heyhe"
    ids = [ord(c) + 3 for c in "hey"]  # the fake's token ids
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 2, "echo": True})
    assert r.json()["choices"][0]["text"] == "heyhe"
    req = {"model": MODEL, "prompt": "hey", "max_tokens": 2, "echo": True, "stream": True, "n": 2}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, timeout=TIMEOUT) as r:
        events = sse_events(r)[:-1]
    for index in (0, 1):
        texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == index]
        assert texts == ["hey", "h", "e"]


def test_completion_logprobs_in_openai_form(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 1, 2]
    # The two most likely, plus the sampled token (here the most likely, so two entries).
    assert lp["top_logprobs"][0] == {"a": -0.25, "b": -0.5}
    req = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "logprobs": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, timeout=TIMEOUT) as r:
        chunks = [e["choices"][0]["logprobs"] for e in sse_events(r)[:-1]]
    assert [c["text_offset"] for c in chunks] == [[0], [1], [2]]  # offsets run on across chunks
    assert [c["top_logprobs"] for c in chunks] == [[{"a": -0.25}], [{"b": -0.25}], [{"c": -0.25}]]


def test_a_logprob_of_minus_infinity_is_still_json():
    class Certain(FakeEngine):
        async def generate(self, request_id, prompt_token_ids, params):
            async for out in super().generate(request_id, prompt_token_ids, params):
                out.logprobs = TokenLogprobs(0.0, [(out.token_id, 0.0), (5, float("-inf"))])
                yield out

    with TestClient(build_app(Certain(), MODEL)) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1, "logprobs": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["top_logprobs"][0]["\x02"] == -9999.0


def test_chat_logprobs_in_openai_form(url):
    req = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
           "logprobs": True, "top_logprobs": 2}
    content = post(url, "/v1/chat/completions", req).json()["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "<", "logprob": -0.25, "bytes": [60],
                          "top_logprobs": [{"token": "<", "logprob": -0.25, "bytes": [60]},
                                           {"token": "=", "logprob": -0.5, "bytes": [61]}]}
    assert post(url, "/v1/chat/completions", {**req, "logprobs": False, "top_logprobs": None}
                ).json()["choices"][0]["logprobs"] is None


def test_compatibility_parameters(url, engine):
    messages = [{"role": "developer", "content": "d"}, {"role": "user", "content": "u", "name": "ann"}]
    req = {"model": MODEL, "messages": messages, "max_tokens": 1, "user": "someone",
           "response_format": {"type": "text"}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
           "repetition_penalty": 1.2}
    assert post(url, "/v1/chat/completions", req).status_code == 200
    prompt, params = engine.calls[-1]
    assert engine.tokenizer.decode(prompt) == "<system>d\n<user=ann>u\n<assistant>"
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    ok = {"model": MODEL, "prompt": "x", "max_tokens": 1, "suffix": "", "best_of": 1, "user": "u"}
    assert post(url, "/v1/completions", ok).status_code == 200
    nulls = {"model": MODEL, "prompt": "x", "max_tokens": 1, "n": None, "stream": None, "stop": None, "echo": None,
             "logprobs": None, "stream_options": None, "seed": None}  # null reads as "not given"
    assert post(url, "/v1/completions", nulls).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "suffix": "tail"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**63}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 99}, "top_logprobs"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_what_the_engine_cannot_do_is_a_400_naming_it(url, path, body, param, stream):
    r = post(url, path, {"model": MODEL, **body, "stream": stream})  # streaming too: refused before the 200
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_model_by_id(url):
    card = httpx.get(f"{url}/v1/models/{MODEL}", timeout=TIMEOUT)
    assert card.status_code == 200 and card.json()["id"] == MODEL
    missing = httpx.get(f"{url}/v1/models/org/other-model", timeout=TIMEOUT)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and "org/other-model" in missing.json()["error"]["message"]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("method,path,content,headers,status,words", [
    ("POST", "/v1/completions", b'{"model": "fake-model", "prompt": "\xff\xfe"}', {}, 400, "UTF-8"),
    ("POST", "/v1/completions", b"\xff\xfe{}", {}, 400, "UTF-8"),
    ("POST", "/v1/completions", DEEP.encode(), {}, 400, "nests too deeply"),
    ("POST", "/v1/completions", ('{"model": "fake-model", "prompt": ' + DEEP + "}").encode(), {}, 400, "deeply"),
    ("POST", "/v1/completions", b'{"model": "fake-model", "prompt": "a\\ud800b"}', {}, 400, "surrogate"),
    ("POST", "/v1/completions", b'{"model": "\\udfff"}', {}, 400, "surrogate"),
    ("POST", "/v1/completions", b'{"model": "fake-model", "prompt": "x", "top_k": 1' + b"0" * 5000 + b"}",
     {}, 400, "not valid JSON"),
    ("POST", "/v1/completions", b"model=fake-model", {"Content-Type": "application/x-www-form-urlencoded"},
     415, "Content-Type"),
    ("POST", "/v1/completions", b"", {}, 400, "not valid JSON"),
    ("POST", "/v1/completions", b"null", {}, 400, "JSON object"),
    ("GET", "/v1/completions", None, {}, 405, "Method Not Allowed"),
    ("POST", "/v1/nothing-here", b"{}", {}, 404, "Not Found"),
    ("GET", "/", None, {}, 404, "Not Found"),
])
def test_every_error_has_the_openai_shape(url, method, path, content, headers, status, words):
    r = httpx.request(method, f"{url}{path}", content=content, headers=headers, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words is None or words in error["message"]


def kv_limited_client(max_request_tokens: int) -> tuple[FakeEngine, TestClient]:
    engine = FakeEngine(max_request_tokens=max_request_tokens)
    return engine, TestClient(build_app(engine, MODEL))


def test_max_tokens_defaults_to_what_the_kv_cache_holds():
    engine, client = kv_limited_client(20)  # the context is 64, the KV cache holds 20 tokens of a request
    with client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abcd"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        for body, param in [({"prompt": "x" * 20}, "prompt"), ({"prompt": "abcd", "max_tokens": 17}, "max_tokens")]:
            r = client.post("/v1/completions", json={"model": MODEL, **body})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == param and error["code"] == "context_length_exceeded"
            assert "KV cache holds at most 20 tokens" in error["message"] and "64" in error["message"]
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "max_completion_tokens": 50})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert not engine.refused  # the server refused first, with the numbers


class RefusingEngine(FakeEngine):
    def _check(self, ids: list[int], params) -> None:
        raise ValueError("the engine refuses this request")


def test_an_engine_refusal_is_a_400_not_a_500():
    with TestClient(build_app(RefusingEngine(), MODEL)) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abcd", "max_tokens": 3})
        assert r.status_code == 400 and "engine refuses" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abcd", "max_tokens": 3, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "invalid_value" and r.text.endswith("data: [DONE]\n\n")


def test_streamed_text_with_unicode_line_separators_survives_a_splitlines_client():
    """U+0085 / U+2028 in the text are escaped, so a client splitting lines as str.splitlines does
    still sees one JSON object per event (the fuzzer found '\x85' echoed raw)."""
    with TestClient(build_app(FakeEngine(scripted=False), MODEL)) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a\x85b\u2028c", "echo": True,
                                                 "max_tokens": 2, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events and "".join(e["choices"][0]["text"] for e in events if e["choices"]).startswith("a\x85b\u2028c")


# -- the real engine: `nexus-tune serve --model tiny --device cpu` in a subprocess -----------
# One running sequence and one waiting slot: the overload test needs them, and the others send
# one request at a time, so a single server process serves the whole module.
TINY = ["--model", "tiny", "--device", "cpu", "--policy", "chunked", "--max-num-seqs", "1", "--max-queue", "1"]
TINY_CONTEXT = 1024  # the tiny preset's max_position_embeddings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyServer:
    """The CLI's server in a subprocess on a free port; its log goes to a file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path, port = log_path, free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nexus_tune", "serve", *TINY, "--port", str(port)],
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> str:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                log = self.log_path.read_text()[-3000:]
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{log}")
            try:
                return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=120, what="the tiny server's /health")
        return self.url

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory) -> Iterator[TinyServer]:
    server = TinyServer(tmp_path_factory.mktemp("serve") / "server.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny(tiny_server) -> str:
    return tiny_server.wait_healthy()


@pytest.fixture(scope="module")
def offline(tiny_server):
    """The offline engine, built while the server process loads (hence the dependency)."""
    from nexus_tune.engine.llm import LLM

    with LLM(model="tiny", policy="chunked", device="cpu") as llm:
        yield llm


def stream_completion(url: str, body: dict) -> tuple[str, dict]:
    """(the streamed text, the usage chunk) of one streamed completion."""
    body = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60.0)) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["text"] for e in events[:-2]), events[-2]["usage"]


@pytest.mark.parametrize("params", [
    {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True},
    {"max_tokens": 16, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 3},
])
def test_tiny_stream_equals_offline_generation(offline, tiny, params):
    prompt = "The quick brown fox jumps over"
    want = offline.generate([prompt], SamplingParams(**params))[0]
    text, usage = stream_completion(tiny, {"prompt": prompt, **params})
    assert text == want.text
    assert usage["completion_tokens"] == len(want.token_ids)
    # The same prompt as token ids gives the same tokens.
    ids = [256, *prompt.encode()]  # the byte tokenizer: BOS then the UTF-8 bytes
    assert stream_completion(tiny, {"prompt": ids, **params})[0] == want.text


def test_tiny_openai_client(tiny):
    client = openai.OpenAI(base_url=f"{tiny}/v1", api_key="unused", timeout=60.0, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, seed=1,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and 1 <= chunks[-1].usage.completion_tokens <= 6
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)


@pytest.mark.parametrize("body,param", [
    ('{"model": "tiny", "prompt": "x", ', None),
    ({"model": "gpt-4", "prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x" * TINY_CONTEXT}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": TINY_CONTEXT}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
])
def test_tiny_bad_request_is_an_openai_400(tiny, body, param):
    r = post(tiny, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tiny_disconnect_returns_kv_blocks(tiny):
    free = metrics(tiny)["nexus_kv_free_blocks"]
    req = {"model": "tiny", "prompt": "y" * 300, "max_tokens": 700, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{tiny}/v1/completions", json=req) as r:
        lines = r.iter_lines()
        next(lines)
        assert metrics(tiny)["nexus_kv_free_blocks"] < free
    wait_for(lambda: metrics(tiny)["nexus_kv_free_blocks"] == free, what="the KV blocks to come back")
    assert metrics(tiny)["nexus_num_requests_running"] == 0


def test_tiny_metrics_parse(tiny):
    post(tiny, "/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 4})
    m = metrics(tiny)
    assert m["nexus_time_to_first_token_seconds_count"] >= 1 and m["nexus_e2e_request_latency_seconds_count"] >= 1
    for name in ("nexus_num_requests_running", "nexus_num_requests_waiting", "nexus_kv_cache_usage_perc",
                 "nexus_kv_free_blocks", "nexus_split_switches_total"):
        assert name in m


def test_tiny_overload_answers_503_and_accepted_requests_complete(tiny):
    # One request runs, one waits, the rest of eight sent at once are turned away.
    body = {"model": "tiny", "prompt": "z", "max_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(tiny, "/v1/completions", body, timeout=120), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    for a in answers:
        if a.status_code == 200:
            assert a.json()["usage"]["completion_tokens"] == 200
        else:
            assert "Retry-After" in a.headers and a.json()["error"]["type"] == "server_overloaded"
    assert post(tiny, "/v1/completions", {**body, "max_tokens": 2}).status_code == 200


def test_tiny_kv_cache_smaller_than_the_context(one_intra_op_thread):
    """The issue's 500: no max_tokens and a KV cache of fewer tokens than the context."""
    from nexus_tune.engine.llm import AsyncLLM

    engine = AsyncLLM("tiny", policy="chunked", device="cpu", num_kv_blocks=8)  # 8 x 16 tokens (+1: the last)
    assert engine.max_request_tokens == 129 < engine.max_model_len == TINY_CONTEXT
    with TestClient(build_app(engine, "tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 129 - 6  # BOS + 5 bytes
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 124})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        assert "KV cache holds at most 129 tokens" in error["message"] and "130" in error["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "y" * 200, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
