"""`nexus-tune bench` against a tiny fake OpenAI-compatible streaming server in a uvicorn thread."""
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nexus_tune.commands import bench
from nexus_tune.commands.cli import main
from nexus_tune.core.workload import make_trace

TOKEN_DELAY_S = 0.002
MAX_TOKENS = 64  # the fake server's output limit: longer requests answer HTTP 400
CONTEXT = 1024  # the context length its /v1/models reports


def fake_app(bytes_per_token: bool) -> FastAPI:
    """Counts prompt tokens as words + 1 (a BOS), or as UTF-8 bytes (a byte-level tokenizer).
    With app.state.limit set, a stream beyond that many in flight answers 503, as an overloaded server."""
    app = FastAPI()
    app.state.in_flight = app.state.max_in_flight = 0
    app.state.limit = None

    def prompt_tokens(body: dict) -> int:
        text = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        return len(text.encode()) if bytes_per_token else len(text.split()) + 1

    async def handle(body: dict, chat: bool):
        n, usage_in = body["max_tokens"], prompt_tokens(body)
        if n > MAX_TOKENS:
            return JSONResponse({"error": {"message": "too long"}}, status_code=400)
        usage = {"prompt_tokens": usage_in, "completion_tokens": n, "total_tokens": usage_in + n}
        if not body.get("stream"):
            return {"choices": [{"text": " tok", "finish_reason": "length"}], "usage": usage}
        if app.state.limit is not None and app.state.in_flight >= app.state.limit:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        app.state.in_flight += 1  # counted on arrival: streams start after every handler has run
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)

        def chunk(i):
            finish = "length" if i == n - 1 else None
            if chat:
                return {"choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": finish}]}
            return {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]}

        async def events():
            try:
                if chat:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
                for i in range(n):
                    await asyncio.sleep(TOKEN_DELAY_S)
                    yield f"data: {json.dumps(chunk(i))}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                app.state.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": CONTEXT}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(await request.json(), chat=True)

    return app


@pytest.fixture(params=[False, True], ids=["bpe", "bytes"])
def server(request):
    app = fake_app(bytes_per_token=request.param)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start: no race with other tests
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app, request.param
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def bench_argv(url, tmp_path, *extra):
    return ["bench", "--base-url", url, "--dataset", "random", "--random-input-len", "200", "--random-output-len",
            "8", "--num-prompts", "12", "--request-rate", "200", "--result-file", str(tmp_path / "r.json"), *extra]


def test_records_every_token(server):
    url, _, bytes_per_token = server
    trace = make_trace("sharegpt-synth", 10, 500.0, seed=1)
    for r in trace:
        r.output_tokens = min(r.output_tokens, MAX_TOKENS)

    async def go():
        async with httpx.AsyncClient() as client:
            writer = await bench.PromptWriter.calibrate(client, url + "/v1/completions", "fake-model", chat=False)
            return await bench.drive(client, url + "/v1/completions", "fake-model", trace, writer, False, None, 0)

    records, duration = asyncio.run(go())
    assert duration > 0
    for req, rec in zip(trace, records):
        assert rec.success and rec.error == ""
        assert rec.output_tokens == req.output_tokens == len(rec.token_times_s)
        assert rec.arrival_s < rec.first_token_s == rec.token_times_s[0] <= rec.finish_s
        assert rec.token_times_s == sorted(rec.token_times_s)
        # prompts written to the server's own token count: exact for 1 token/word, within a word for bytes
        assert abs(rec.prompt_tokens - req.prompt_tokens) <= (5 if bytes_per_token else 0)


def test_bench_cli_writes_vllm_json(server, tmp_path, capsys):
    url, _, _ = server
    assert main(bench_argv(url, tmp_path, "--goodput", "ttft:60000", "tpot:60000")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "p90_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms",
                "std_e2el_ms", "input_lens", "output_lens", "ttfts", "itls", "errors", "request_rate", "burstiness",
                "model_id"):
        assert key in result, key
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["model_id"] == "fake-model"
    assert result["output_lens"] == [8] * 12 and result["total_output_tokens"] == 96
    assert all(len(itl) == 7 for itl in result["itls"])
    assert result["mean_tpot_ms"] > 0 and result["p99_ttft_ms"] >= result["median_ttft_ms"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # generous SLOs: all good
    out = capsys.readouterr().out
    assert "Serving benchmark result" in out and "TTFT" in out


def test_goodput_counts_only_requests_meeting_slos(server, tmp_path):
    url, _, _ = server
    # 8 tokens 2 ms apart cannot reach a TPOT of 0.001 ms: nobody meets it
    assert main(bench_argv(url, tmp_path, "--goodput", "tpot:0.001")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["request_goodput"] == 0.0 and result["slo_attainment"] == 0.0 and result["completed"] == 12


def test_failed_requests_and_chat_endpoint(server, tmp_path, capsys):
    url, _, _ = server
    argv = bench_argv(url, tmp_path, "--endpoint", "/v1/chat/completions")
    argv[argv.index("--random-output-len") + 1] = str(MAX_TOKENS + 1)  # the fake server refuses these
    assert main(argv) == 1  # every request failed: a broken setup, not a measurement
    assert "every request failed; the first: HTTP 400" in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())  # still written, for the errors
    assert result["completed"] == 0 and result["failed"] == 12
    assert all(e.startswith("HTTP 400") for e in result["errors"])
    assert main(bench_argv(url, tmp_path, "--endpoint", "/v1/chat/completions")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 12 and result["output_lens"] == [8] * 12  # the role-only chunk is no token


def test_max_concurrency_caps_in_flight(server, tmp_path):
    url, app, _ = server
    assert main(bench_argv(url, tmp_path, "--request-rate", "inf", "--max-concurrency", "2")) == 0
    assert app.state.max_in_flight == 2
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 12


def test_sweep_finds_capacity_and_plots(server, tmp_path):
    url, app, _ = server
    # 4 streams at a time: near-regular arrivals every 50 ms all pass (a stream lasts ~16 ms); 12 at
    # once lose 8 to 503s, so the highest rate fails the SLO however fast the machine is.
    app.state.limit = 4
    plot = tmp_path / "sweep.png"
    argv = bench_argv(url, tmp_path, "--sweep", "100000,20", "--burstiness", "100", "--goodput", "ttft:60000",
                      "--plot", str(plot))
    assert main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    runs = result["runs"]
    assert [run["request_rate"] for run in runs] == [20.0, 100000.0]
    assert runs[0]["slo_attainment"] == 1.0 and runs[1]["slo_attainment"] < 0.9
    assert result["capacity"] == 20.0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_requests_longer_than_the_servers_context_are_refused_before_sending(server, tmp_path, capsys):
    url, app, _ = server
    argv = bench_argv(url, tmp_path, "--random-input-len", str(CONTEXT))
    assert main(argv) == 2
    assert f"12 of 12 requests need more than the server's context of {CONTEXT}" in capsys.readouterr().err
    assert app.state.max_in_flight == 0 and not (tmp_path / "r.json").exists()


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    unreachable = "http://127.0.0.1:9"
    assert main(bench_argv(unreachable, tmp_path, "--sweep", "1,2")) == 2  # a sweep needs SLOs
    assert main(bench_argv(unreachable, tmp_path)) == 1  # more bad input: test_cli_errors.py
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_which_chunks_carry_tokens():
    def comp(text, finish=None):
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    def chat(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert bench.carries_token(comp(" a"), chat=False)
    assert bench.carries_token(comp(""), chat=False)  # a partial multi-byte character is still a token
    assert bench.carries_token(comp(" z", "length"), chat=False)
    assert not bench.carries_token(comp("", "stop"), chat=False)
    assert not bench.carries_token({"choices": [], "usage": {"completion_tokens": 3}}, chat=False)
    assert not bench.carries_token(chat({"role": "assistant", "content": ""}), chat=True)
    assert bench.carries_token(chat({"content": " b"}), chat=True)
    assert bench.carries_token(chat({"content": ""}), chat=True)
    assert not bench.carries_token(chat({}, "length"), chat=True)
    assert bench.parse_event('data: {"a": 1}') == {"a": 1}
    assert bench.parse_event("data: [DONE]") is None and bench.parse_event(": ping") is None
