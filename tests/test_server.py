"""The OpenAI-compatible server (engine/server.py).

Two layers: the request logic over a small fake engine that follows AsyncLLM's contract
(served in-process by uvicorn in a thread; it can hold, fail and count blocks on demand), then
the real thing: `python -m nexus_tune serve --model tiny --device cpu` in a subprocess.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jinja2
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from engine.llm import TokenOutput
from engine.server import build_app
from nexus_tune.sequence import SamplingParams

MODEL = "fake-model"
TIMEOUT = httpx.Timeout(10.0)


# -- helpers shared by both layers ---------------------------------------------------------
def sse_events(resp: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an SSE response: parsed JSON, or the literal "[DONE]"."""
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metrics(base_url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels folded into the name), parsed by prometheus_client."""
    text = httpx.get(f"{base_url}/metrics", timeout=TIMEOUT).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the fake engine -----------------------------------------------------------------------
class FakeTokenizer:
    """Bytes + 3 as ids (0..2 reserved, 2 = EOS); a chat template that shows the roles."""

    eos_token_id = 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        if any(m["content"] == "refuse" for m in messages):
            raise jinja2.TemplateError("this template refuses")  # a template's raise_exception()
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>" * add_generation_prompt
        return self.encode(text) if tokenize else text


class FakeEngine:
    """AsyncLLM's contract, in the server's event loop. Echoes the prompt back, one byte a token.

    Prompts steer it: "hold..." waits after the first token and "queue..." before it until
    `gate` is set; "fail..." ends in an error output; "raise..." raises inside generate.
    Each running request holds one KV block per 4 tokens.
    """

    max_model_len = 64
    num_blocks = 100

    def __init__(self) -> None:
        self.failed: str | None = None  # set to make the engine report a dead loop
        self.tokenizer = FakeTokenizer()
        self.gate = threading.Event()
        self.blocks: dict[str, int] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple[list[int], object]] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def stats(self) -> dict:
        used = sum(self.blocks.values())
        return {"running": len(self.blocks), "waiting": 0, "kv_usage": used / self.num_blocks,
                "free_blocks": self.num_blocks - used, "prefill_sms": None, "split_switches": 3,
                "failed": self.failed}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.blocks.pop(request_id, None)

    async def _wait_gate(self) -> None:
        while not self.gate.is_set():
            await asyncio.sleep(0.005)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params):
        self.calls.append((list(prompt_token_ids), params))
        prompt = self.tokenizer.decode(prompt_token_ids)
        if prompt.startswith("raise"):
            raise RuntimeError("boom")
        if prompt.startswith("queue"):
            await self._wait_gate()
        self.blocks[request_id] = (len(prompt_token_ids) + 3) // 4
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(0)
                if prompt.startswith("fail") and i == 2:
                    yield TokenOutput(request_id, None, "", True, "error", error="the fake failed")
                    return
                if prompt.startswith("hold") and i == 1:
                    await self._wait_gate()
                token = prompt_token_ids[i % len(prompt_token_ids)]
                last = i == params.max_tokens - 1
                yield TokenOutput(request_id, token, self.tokenizer.decode([token]), last, "length" if last else None)
        finally:
            self.blocks.pop(request_id, None)


class ThreadServer:
    """A uvicorn server in a daemon thread on a free port (port 0: the OS picks)."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, what="the uvicorn thread to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


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
    import engine.server

    monkeypatch.setattr(engine.server, "MAX_BODY_BYTES", 1000)
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
    ({"model": MODEL, "prompt": "x", "logprobs": 2, "echo": True}, "logprobs", "logprobs, echo"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n", "n=1"),
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
    from engine.llm import LLM

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
