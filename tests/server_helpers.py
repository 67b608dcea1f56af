"""What the server's tests share: uvicorn in a thread, SSE parsing, and a small engine that
follows AsyncLLM's contract (docs/architecture.md).

The fake engine echoes the prompt back, one byte a token, in the server's event loop. It checks
what the real engine checks (token ids, context, KV capacity) and counts what it refuses, so a
test can assert that the server let nothing through that the engine would turn away; and it
runs the real sampler once per request on random logits, so whatever parameters the server
passes on must work there too (a huge top_k once overflowed it).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jinja2
import torch
import uvicorn

from nexus_tune.engine import sampling
from nexus_tune.engine.llm import TokenOutput
from nexus_tune.engine.server import DrainingServer
from nexus_tune.engine.sampling import TokenLogprobs


def sse_events(resp: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an SSE response: parsed JSON, or the literal "[DONE]"."""
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class ThreadServer:
    """A uvicorn server in a daemon thread on a free port (port 0: the OS picks); with `drain`, the
    server's own DrainingServer (set `server.should_exit` / `force_exit` where a signal would)."""

    def __init__(self, app, drain: bool = False) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = DrainingServer(config, app.state.server) if drain else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, what="the uvicorn thread to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


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
        text = "".join(f"<{m['role']}{'=' + m['name'] if 'name' in m else ''}>{m['content']}\n" for m in messages)
        text += "<assistant>" * add_generation_prompt
        return self.encode(text) if tokenize else text


def fake_logprobs(token: int, count: int) -> TokenLogprobs:
    """Made-up but consistent: the echoed token is the most likely, then the ids after it."""
    top = [((token + k) % FakeTokenizer.vocab_size, -0.25 * (k + 1)) for k in range(count)]
    return TokenLogprobs(-0.25, top)


class FakeEngine:
    """Prompts steer it when `scripted`: "hold..." waits after the first token and "queue..."
    before it until `gate` is set; "fail..." ends in an error output; "raise..." raises inside
    generate; "slow..." sleeps `token_delay_s` before each token. Each running request holds
    one KV block per 4 tokens.
    """

    max_model_len = 64
    num_blocks = 100

    def __init__(self, scripted: bool = True, max_request_tokens: int | None = None,
                 token_delay_s: float = 0.05) -> None:
        self.scripted, self.token_delay_s = scripted, token_delay_s
        self.max_request_tokens = max_request_tokens or self.max_model_len
        self.failed: str | None = None  # set to make the engine report a dead loop
        self.tokenizer = FakeTokenizer()
        self.gate = threading.Event()
        self.blocks: dict[str, int] = {}
        self.aborted: list[str] = []
        self.refused: list[str] = []  # what the engine refused: the server should have caught it first
        self.calls: list[tuple[list[int], object]] = []
        self._ended: dict[str, asyncio.Event] = {}
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def stats(self) -> dict:
        used = sum(self.blocks.values())
        return {"running": len(self.blocks), "waiting": 0, "kv_usage": used / self.num_blocks,
                "free_blocks": self.num_blocks - used, "total_blocks": self.num_blocks, "prefill_sms": None,
                "split_switches": 3, "failed": self.failed}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.blocks.pop(request_id, None)
        if request_id in self._ended:
            self._ended[request_id].set()

    def _check(self, ids: list[int], params) -> None:
        """AsyncLLM's ValueErrors for a request it can never run."""
        problem = None
        if not ids or min(ids) < 0 or max(ids) >= self.tokenizer.vocab_size:
            problem = f"bad prompt ids {ids[:5]}"
        elif len(ids) + params.max_tokens > self.max_request_tokens:
            problem = f"{len(ids)} + {params.max_tokens} tokens exceed {self.max_request_tokens}"
        if problem:
            self.refused.append(problem)
            raise ValueError(problem)
        logits = torch.randn(1, self.tokenizer.vocab_size)
        sampling.logprobs(logits, sampling.sample(logits, [params], [0], [ids]), [params])

    async def _wait_gate(self, ended: asyncio.Event) -> None:
        while not (self.gate.is_set() or ended.is_set()):
            await asyncio.sleep(0.005)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params):
        self.calls.append((list(prompt_token_ids), params))
        self._check(list(prompt_token_ids), params)
        prompt = self.tokenizer.decode(prompt_token_ids) if self.scripted else ""
        if prompt.startswith("raise"):
            raise RuntimeError("boom")
        ended = self._ended[request_id] = asyncio.Event()
        try:
            if prompt.startswith("queue"):
                await self._wait_gate(ended)
            self.blocks[request_id] = (len(prompt_token_ids) + 3) // 4
            for i in range(params.max_tokens):
                await asyncio.sleep(self.token_delay_s if prompt.startswith("slow") else 0)
                if prompt.startswith("fail") and i == 2:
                    yield TokenOutput(request_id, None, "", True, "error", error="the fake failed")
                    return
                if prompt.startswith("hold") and i == 1:
                    await self._wait_gate(ended)
                if ended.is_set():  # AsyncLLM's contract: abort() ends the stream with an "abort" output
                    yield TokenOutput(request_id, None, "", True, "abort", error="the request was aborted")
                    return
                token = prompt_token_ids[i % len(prompt_token_ids)]
                last = i == params.max_tokens - 1
                lp = None if params.logprobs is None else fake_logprobs(token, params.logprobs)
                yield TokenOutput(request_id, token, self.tokenizer.decode([token]), last,
                                  "length" if last else None, logprobs=lp)
        finally:
            self.blocks.pop(request_id, None)
            self._ended.pop(request_id, None)
