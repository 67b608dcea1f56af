"""Graceful shutdown (nexus_tune/engine/server.py: OpenAIServer.drain, DrainingServer, serve).

Open requests get up to `shutdown_timeout` seconds to finish; then every one still open ends
with an error (an error event and [DONE] on a stream); a second SIGINT cuts the wait short; the
engine shuts down in every case. In-process with uvicorn in a thread (the flags a signal would
set), then with real signals against `serve` in a subprocess.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from nexus_tune.engine.server import build_app
from server_helpers import FakeEngine, ThreadServer, wait_for

MODEL = "fake-model"
TESTS = Path(__file__).resolve().parent


class Stream(threading.Thread):
    """One streamed completion read to its end in a thread: `events`, or `failure`."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        self.url, self.events, self.first = url, [], threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=30.0) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc
            self.first.set()

    def outcome(self) -> tuple[str | None, bool]:
        """(the error code of an error event or None, whether the stream ended with [DONE])."""
        assert self.failure is None, self.failure
        errors = [e["error"]["code"] for e in self.events if isinstance(e, dict) and "error" in e]
        return (errors[0] if errors else None), self.events[-1:] == ["[DONE]"]


def serving(engine: FakeEngine, timeout: float) -> ThreadServer:
    return ThreadServer(build_app(engine, MODEL, shutdown_timeout=timeout), drain=True)


def test_requests_that_finish_within_the_timeout_complete():
    engine = FakeEngine(token_delay_s=0.05)
    server = serving(engine, timeout=10.0)
    with server as url:
        stream = Stream(url, "slow and steady", 12)  # about 0.6 s of tokens
        stream.start()
        stream.first.wait(10)
        started = time.monotonic()
        server.server.should_exit = True  # what SIGTERM does
        stream.join(10)
        server.thread.join(10)
    assert stream.outcome() == (None, True)
    assert stream.events[-2]["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - started < 5  # it waited for the stream, not for the whole timeout
    assert engine.stopped and not engine.aborted
    with pytest.raises(httpx.ConnectError):  # the listening socket is closed
        httpx.get(f"{url}/health", timeout=2.0)


def test_after_the_timeout_every_open_request_ends_with_an_error():
    engine = FakeEngine()
    server = serving(engine, timeout=0.5)
    with server as url:
        stream = Stream(url, "hold this", 20)  # holds after its first token until the gate opens
        stream.start()
        stream.first.wait(10)
        answers = []
        held = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "hold too", "max_tokens": 5}, timeout=30.0)))
        held.start()
        wait_for(lambda: len(engine.blocks) == 2, what="both requests running")
        started = time.monotonic()
        server.server.should_exit = True
        stream.join(10)
        held.join(10)
        server.thread.join(10)
    assert 0.4 < time.monotonic() - started < 5
    assert stream.outcome() == ("shutting_down", True)
    assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "shutting_down"
    assert len(set(engine.aborted)) == 2  # both were aborted
    assert engine.stopped and not engine.blocks


def test_a_forced_exit_cuts_the_drain_short_and_still_ends_streams_cleanly():
    engine = FakeEngine()
    server = serving(engine, timeout=60.0)
    with server as url:
        stream = Stream(url, "hold on", 20)
        stream.start()
        stream.first.wait(10)
        started = time.monotonic()
        server.server.should_exit = True
        time.sleep(0.3)
        server.server.force_exit = True  # what a second SIGINT does
        stream.join(10)
        server.thread.join(10)
    assert time.monotonic() - started < 5
    assert stream.outcome() == ("shutting_down", True)
    assert engine.stopped


def test_new_requests_while_draining_get_a_503():
    engine = FakeEngine()
    with TestClient(build_app(engine, MODEL)) as client:
        client.app.state.server.closing = True
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and "Retry-After" in r.headers
    assert engine.stopped and not engine.calls


# -- real signals: `serve` in a subprocess -----------------------------------------------------
SERVE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from nexus_tune.engine.server import build_app, serve
    from server_helpers import FakeEngine

    class Engine(FakeEngine):
        def shutdown(self):
            print("ENGINE SHUTDOWN", flush=True)

    serve(build_app(Engine(), "fake-model", shutdown_timeout=float(sys.argv[2])), "127.0.0.1", int(sys.argv[1]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("second,timeout,most_s", [
    (signal.SIGTERM, 1.5, 10.0),  # a second SIGTERM changes nothing: the drain runs its course
    (signal.SIGINT, 60.0, 10.0),  # a second SIGINT forces the exit: no 60 s wait
])
def test_signals_drain_abort_and_always_shut_the_engine_down(second, timeout, most_s):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port), str(timeout), str(TESTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=60, what="the server to start")
        stream = Stream(url, "hold it", 20)
        stream.start()
        stream.first.wait(10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(second)
        stream.join(most_s)
        proc.wait(most_s)
        elapsed = time.monotonic() - started
        log = proc.stdout.read()
    finally:
        proc.kill()
    assert stream.outcome() == ("shutting_down", True), log
    assert "ENGINE SHUTDOWN" in log
    assert elapsed < most_s and (second == signal.SIGINT or elapsed > timeout - 0.1)
