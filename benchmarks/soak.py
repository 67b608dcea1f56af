r"""Soak test of `nexus-tune serve` (issue 14): sustained overload with abuse mixed in.

On the lent H200, R = 1.5x the nexus capacity that benchmarks/capacity.py measured on the engine
(llama-mixed); until that run exists, 1.5x the simulated one that `nexus-tune plan --profile
profiles/h200/llama-3.1-8b.json --workload mixed --slo ttft=3000,tpot=50` prints:

    PYTHONPATH=. python3 benchmarks/soak.py --model llama-3.1-8b --policy nexus --request-rate R --duration 600 --out $OUT

On that machine the server's web stack (fastapi, starlette, uvicorn, pydantic) must travel as wheels
in `.whl` (/work/.library/device/README.md), so the path is `PYTHONPATH=.:/tmp/site`; and the run (model
start-up, 10 minutes of load, the drain: 12-15 minutes) outlasts one device command (10 minutes), so
it runs detached and later commands, each sent as soon as the one before returns, collect it:

    1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       && mkdir -p /tmp/soak && (setsid nohup sh -c 'PYTHONPATH=.:/tmp/site python3 benchmarks/soak.py \
       --model llama-3.1-8b --policy nexus --request-rate R --duration 600 --out /tmp/soak; echo $? >/tmp/soak/rc' \
       >/tmp/soak/stdout.txt 2>&1 &)
    2. timeout 580 sh -c 'until [ -f /tmp/soak/rc ]; do sleep 5; done'; cp /tmp/soak/* $OUT/   (again until rc is there)

A CPU run in seconds (tests/test_soak.py runs one):

    PYTHONPATH=. python3 benchmarks/soak.py --model tiny --device cpu --policy chunked --request-rate 4 \
        --duration 5 --dataset random --random-input-len 32 --random-output-len 8

It starts the real server (`python -m nexus_tune serve ...`) in a subprocess on a free port, waits
for /health, and for --duration seconds sends the --dataset trace at --request-rate, each request of
one kind (the shares are of the trace's requests):
- normal: streamed or not, /v1/completions or /v1/chat/completions, the planned lengths (fitted to
  the context); may complete or get a 503 (overload);
- disconnect (--disconnect-share): gathered into storms of --storm-size clients sent at once, every one
  of which goes away --storm-hold seconds later, mid-stream or still queued (streamed or not, no
  max_tokens: the server's default, all that fits);
- oversize (--oversize-share): a prompt longer than the context (text, chat or token ids), max_tokens
  beyond it, or the two together; must get a 400;
- malformed (--malformed-share): broken JSON, invalid UTF-8, deep nesting, wrong types, unknown
  parameters, a wrong Content-Type, ...; must get a 4xx.
After the last send it waits up to --drain-timeout for every answer, then until the server is idle,
reads /metrics and /health, and finally sends SIGTERM. Checks (exit 1 when any fails, 2 when the
server never came up): no request lost (sent, not cut by us, never fully answered), no 5xx but 503,
no broken 200 (an error event, a stream without [DONE]), every answer as its kind expects, every KV
block free again (`nexus_kv_free_blocks` equal to `nexus_kv_total_blocks`, `nexus_kv_cache_usage_perc` 0),
the server's own counts of 503s and finished requests matching the client's, /health 200, the process
alive, and its graceful exit (uvicorn's shutdown logged, code 0 or -SIGTERM, which uvicorn re-raises)
within --shutdown-timeout plus the server's abort grace. A table is printed; `soak.json` (every count,
per-variant statuses, sample errors, metrics, checks) and the server's log `soak-server.log` go to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from nexus_tune.engine.server import ABORT_GRACE_S, SHUTDOWN_TIMEOUT_S
from nexus_tune.commands.bench import HTTP_TIMEOUT, PromptWriter, request_body, served_model, parse_event
from nexus_tune.commands.reporting import progress_bar
from nexus_tune.core.workload import DATASETS, TraceRequest, make_trace

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
console = Console(width=160)

# What one request ended as.
COMPLETED, REFUSED, OVERLOADED = "completed", "refused (4xx)", "overloaded (503)"
SERVER_ERROR, BROKEN, DISCONNECTED, LOST = "other 5xx", "broken 200", "disconnected", "lost"
RESULTS = (COMPLETED, REFUSED, OVERLOADED, SERVER_ERROR, BROKEN, DISCONNECTED, LOST)
# The results a kind may end as that are not failures in themselves; oversize must be a 400 exactly.
ALLOWED = {"normal": {COMPLETED, OVERLOADED}, "disconnect": {COMPLETED, OVERLOADED, DISCONNECTED},
           "oversize": {REFUSED}, "malformed": {REFUSED}}
KINDS = tuple(ALLOWED)

CONTEXT_MARGIN = 64  # tokens a normal request leaves free: the prompt writer's error and a chat template's
FILLER_ID = 100  # a token id inside every vocabulary here (the tiny presets have 384)
HEALTH_POLL_S = 0.5
EXIT_SLACK_S = 10.0  # beyond the drain and abort grace: uvicorn's and the engine's own shutdown
FREE_BLOCKS, TOTAL_BLOCKS, KV_USAGE = "nexus_kv_free_blocks", "nexus_kv_total_blocks", "nexus_kv_cache_usage_perc"
# /metrics gauges that are all 0 once the server has nothing left to do (then KV_USAGE too).
IDLE_GAUGES = ("nexus_num_requests_running", "nexus_num_requests_waiting", "nexus_server_pending_requests")
GRACEFUL_EXIT_LINE = "Finished server process"  # uvicorn's last log line after its shutdown ran
SERVE_FLAGS = ("--profile", "--slo", "--max-num-seqs", "--max-queue", "--max-model-len")  # passed on when set


class SoakError(Exception):
    """The soak could not run (the server never came up); no verdict on the server's behaviour."""


@dataclass
class Job:
    """One request to send."""

    kind: str  # one of KINDS
    variant: str  # how it is sent ("chat stream") or what is wrong with it ("ids_over_context")
    at_s: float  # when it is sent, seconds after the start
    path: str
    body: dict[str, Any] | bytes  # bytes: sent as they are (malformed bodies), with `content_type`
    stream: bool = False
    content_type: str = "application/json"
    cut_s: float | None = None  # disconnect jobs: when the client goes away, seconds after the start


@dataclass
class Outcome:
    job: Job
    result: str = LOST  # until an answer says otherwise
    status: int | None = None
    detail: str = ""


# -- the requests ---------------------------------------------------------------------------
def _text_request(path: str, model: str, text: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    prompt = {"messages": [{"role": "user", "content": text}]} if path == CHAT else {"prompt": text}
    return path, {"model": model, **prompt, **fields}


def oversize_variants(model: str, context: int, text: Callable[[int], str]) -> list[tuple[str, Callable]]:
    """(name, () -> (path, body)) for each way a request can not fit; built lazily (the prompts are big)."""
    over, half = context + 1, context // 2
    return [
        ("text_prompt_over_context", lambda: _text_request(COMPLETIONS, model, text(over + 64), max_tokens=16)),
        ("chat_prompt_over_context", lambda: _text_request(CHAT, model, text(over + 64), max_tokens=16)),
        ("ids_over_context", lambda: (COMPLETIONS, {"model": model, "prompt": [FILLER_ID] * over, "max_tokens": 1})),
        ("max_tokens_over_context", lambda: _text_request(COMPLETIONS, model, "hello", max_tokens=over)),
        ("max_completion_tokens_over_context", lambda: _text_request(CHAT, model, "hello",
                                                                     max_completion_tokens=over)),
        ("prompt_plus_max_tokens_over_context",
         lambda: (COMPLETIONS, {"model": model, "prompt": [FILLER_ID] * half, "max_tokens": over - half})),
    ]


def malformed_variants(model: str) -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, Content-Type) of bodies the server must refuse with a 4xx."""
    def js(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    ok = {"model": model, "prompt": "hello", "max_tokens": 4}
    return [
        ("truncated_json", COMPLETIONS, js(ok)[:-9], "application/json"),
        ("not_an_object", COMPLETIONS, b"[1, 2, 3]", "application/json"),
        ("invalid_utf8", COMPLETIONS, b'{"model": "%s", "prompt": "\xff\xfe"}' % model.encode(), "application/json"),
        ("deep_nesting", COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, "application/json"),
        ("lone_surrogate", COMPLETIONS, js(ok).replace(b'"hello"', b'"\\ud800"'), "application/json"),
        ("wrong_content_type", COMPLETIONS, js(ok), "text/plain"),
        ("missing_prompt", COMPLETIONS, js({"model": model, "max_tokens": 4}), "application/json"),
        ("max_tokens_not_int", COMPLETIONS, js({**ok, "max_tokens": "ten"}), "application/json"),
        ("zero_max_tokens", COMPLETIONS, js({**ok, "max_tokens": 0, "stream": True}), "application/json"),
        ("huge_top_k", COMPLETIONS, js({**ok, "top_k": 2**63}), "application/json"),
        ("temperature_out_of_range", COMPLETIONS, js({**ok, "temperature": 5}), "application/json"),
        ("unknown_parameter", COMPLETIONS, js({**ok, "tools": []}), "application/json"),
        ("unknown_model", COMPLETIONS, js({**ok, "model": "no-such-model"}), "application/json"),
        ("empty_messages", CHAT, js({"model": model, "messages": []}), "application/json"),
        ("unknown_role", CHAT, js({"model": model, "messages": [{"role": "wizard", "content": "hi"}]}),
         "application/json"),
    ]


@dataclass
class Planner:
    """Turns trace requests into jobs: a method per kind, (trace request, index among its kind) -> Job."""

    model: str
    context: int  # the server's max_model_len
    writer: PromptWriter
    rng: np.random.Generator
    chat_share: float
    stream_share: float

    def __post_init__(self) -> None:
        self.oversize_kinds = oversize_variants(self.model, self.context, partial(self.writer.text, rng=self.rng))
        self.malformed_kinds = malformed_variants(self.model)

    def _shape(self) -> tuple[str, bool]:
        path = CHAT if self.rng.random() < self.chat_share else COMPLETIONS
        return path, bool(self.rng.random() < self.stream_share)

    def _fit(self, req: TraceRequest) -> tuple[int, int]:
        """The request's (prompt, output) tokens, shortened to fit the context: a normal request must run."""
        room = self.context - CONTEXT_MARGIN
        output = min(req.output_tokens, room // 2)
        return min(req.prompt_tokens, room - output), output

    def normal(self, req: TraceRequest, i: int) -> Job:
        path, stream = self._shape()
        prompt_tokens, output = self._fit(req)
        body = request_body(self.model, req.prompt or self.writer.text(prompt_tokens, self.rng), output, path == CHAT,
                        stream)
        variant = f"{'chat' if path == CHAT else 'completion'} {'stream' if stream else 'full'}"
        return Job("normal", variant, req.arrival_s, path, body, stream)

    def disconnect(self, req: TraceRequest, i: int) -> Job:
        job = self.normal(req, i)
        del job.body["max_tokens"]  # the server's default, all that fits: it runs until we go away
        job.kind = "disconnect"
        return job

    def oversize(self, req: TraceRequest, i: int) -> Job:
        name, build = self.oversize_kinds[i % len(self.oversize_kinds)]
        path, body = build()
        stream = bool(self.rng.random() < self.stream_share)
        return Job("oversize", name, req.arrival_s, path, {**body, "stream": stream}, stream)

    def malformed(self, req: TraceRequest, i: int) -> Job:
        name, path, body, content_type = self.malformed_kinds[i % len(self.malformed_kinds)]
        return Job("malformed", name, req.arrival_s, path, body, content_type=content_type)


def assign_kinds(n: int, shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Exact counts per kind (at least one of a kind with a share), in random order; the rest normal."""
    counts = {kind: max(1, round(share * n)) if share > 0 else 0 for kind, share in shares.items()}
    normal = n - sum(counts.values())
    if normal < 0:
        raise ValueError(f"the shares {shares} leave no room in a trace of {n} requests")
    kinds = [kind for kind, count in counts.items() for _ in range(count)] + ["normal"] * normal
    return [kinds[i] for i in rng.permutation(n)]


def form_storms(jobs: list[Job], size: int, hold_s: float) -> None:
    """Gather the disconnect jobs, in arrival order, into storms of `size` sent together (at the last
    member's arrival, so no one is early) and cut together `hold_s` later."""
    members = [j for j in jobs if j.kind == "disconnect"]
    for start in range(0, len(members), size):
        storm = members[start:start + size]
        at_s = storm[-1].at_s
        for job in storm:
            job.at_s, job.cut_s = at_s, at_s + hold_s


def plan(args: argparse.Namespace, model: str, context: int, writer: PromptWriter) -> list[Job]:
    """Every job of the run: the trace's arrivals in the first --duration seconds, each of one kind."""
    expected = args.request_rate * args.duration
    num = math.ceil(expected + 5 * math.sqrt(expected)) + 10  # enough arrivals to cover the duration
    trace = make_trace(args.dataset, num, args.request_rate, args.burstiness, args.seed, args.dataset_path,
                       args.random_input_len, args.random_output_len)
    trace = [r for r in trace if r.arrival_s < args.duration]
    rng = np.random.default_rng([args.seed, 3])
    planner = Planner(model, context, writer, rng, args.chat_share, args.stream_share)
    shares = {"disconnect": args.disconnect_share, "oversize": args.oversize_share,
              "malformed": args.malformed_share}
    made: Counter[str] = Counter()
    jobs = []
    for req, kind in zip(trace, assign_kinds(len(trace), shares, rng)):
        jobs.append(getattr(planner, kind)(req, made[kind]))
        made[kind] += 1
    form_storms(jobs, args.storm_size, args.storm_hold)
    return jobs


# -- sending ---------------------------------------------------------------------------------
def _content(job: Job) -> dict[str, Any]:
    if isinstance(job.body, bytes):
        return {"content": job.body, "headers": {"content-type": job.content_type}}
    return {"json": job.body}


async def _stream_problem(resp: httpx.Response) -> str:
    """What is wrong with a 200 stream ("" when it ended with a finish reason and [DONE])."""
    finished = done = False
    async for line in resp.aiter_lines():
        if line.strip() == "data: [DONE]":
            done = True
            continue
        event = parse_event(line)
        if event is None:
            continue
        if "error" in event:
            return f"error event: {json.dumps(event['error'])[:300]}"
        finished = finished or any(c.get("finish_reason") for c in event.get("choices") or [])
    return "" if finished and done else f"the stream ended with finish reason {finished}, [DONE] {done}"


def _body_problem(resp: httpx.Response) -> str:
    """What is wrong with a 200 JSON answer ("" when its choice finished)."""
    try:
        choices = resp.json().get("choices")
    except (ValueError, AttributeError):
        return f"not a JSON object: {resp.text[:300]}"
    return "" if choices and choices[0].get("finish_reason") in ("stop", "length") else resp.text[:300]


async def exchange(client: httpx.AsyncClient, url: str, job: Job) -> tuple[int, str]:
    """(HTTP status, detail): for a 200, what is wrong with the answer ("" if nothing); else its body."""
    if job.stream:
        async with client.stream("POST", url, **_content(job)) as resp:
            if resp.status_code == 200:
                return 200, await _stream_problem(resp)
            return resp.status_code, (await resp.aread()).decode(errors="replace")[:300]
    resp = await client.post(url, **_content(job))
    return resp.status_code, _body_problem(resp) if resp.status_code == 200 else resp.text[:300]


def classify(status: int, detail: str) -> str:
    if status == 200:
        return BROKEN if detail else COMPLETED
    if status == 503:
        return OVERLOADED
    if 400 <= status < 500:
        return REFUSED
    return SERVER_ERROR if status >= 500 else BROKEN


async def run_job(client: httpx.AsyncClient, base_url: str, out: Outcome, t0: float) -> None:
    job = out.job
    await asyncio.sleep(max(0.0, t0 + job.at_s - time.perf_counter()))
    answer = exchange(client, base_url + job.path, job)
    try:
        if job.cut_s is None:
            out.status, out.detail = await answer
        else:  # wait_for cancels the exchange, which closes the connection: the client is gone
            out.status, out.detail = await asyncio.wait_for(answer, t0 + job.cut_s - time.perf_counter())
    except TimeoutError:
        out.result = DISCONNECTED
        return
    except httpx.HTTPError as exc:  # refused, reset or cut connections: no complete answer (stays LOST)
        out.detail = f"{type(exc).__name__}: {exc}"[:300]
        return
    except json.JSONDecodeError as exc:
        out.result, out.detail = BROKEN, f"an event that is not JSON: {exc}"
        return
    out.result = classify(out.status, out.detail)


async def run_jobs(client: httpx.AsyncClient, base_url: str, jobs: list[Job], deadline_s: float,
                   on_done: Callable[[], None]) -> list[Outcome]:
    """Send every job at its instant; a job with no answer `deadline_s` after the start is cut and LOST."""
    outcomes = [Outcome(job) for job in jobs]
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(run_job(client, base_url, out, t0)) for out in outcomes]
    for task in tasks:
        task.add_done_callback(lambda _: on_done())
    await asyncio.wait(tasks, timeout=deadline_s)
    for task, out in zip(tasks, outcomes):
        if not task.done():
            task.cancel()
            out.detail = f"no answer {deadline_s:.0f} s after the start"
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes


# -- the server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "nexus_tune", "serve", "--model", args.model, "--policy", args.policy,
           "--device", args.device, "--port", str(port), "--shutdown-timeout", str(args.shutdown_timeout)]
    for flag in SERVE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def start_server(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """The server with the repository first on its path (PYTHONPATH=.), any carried site folder after."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def health(client: httpx.AsyncClient, base_url: str) -> int | None:
    try:
        return (await client.get(f"{base_url}/health", timeout=5.0)).status_code
    except httpx.HTTPError:
        return None


async def wait_healthy(client: httpx.AsyncClient, base_url: str, proc: subprocess.Popen, timeout_s: float,
                       log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while await health(client, base_url) != 200:
        if proc.poll() is not None:
            raise SoakError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SoakError(f"no /health 200 within {timeout_s:.0f} s; see {log_path}")
        await asyncio.sleep(HEALTH_POLL_S)


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """/metrics as {name or name{label=value}: value}; {} when the server does not answer."""
    try:
        resp = await client.get(f"{base_url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return {}
    if resp.status_code != 200:
        return {}
    values = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            if s.name.endswith(("_created", "_bucket")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


async def settle(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until the server is idle (aborts free their blocks a step later); (last scrape, s)."""
    start = time.perf_counter()
    while True:
        values = await scrape(client, base_url)
        waited = time.perf_counter() - start
        if not values or all(values.get(k) == 0.0 for k in (*IDLE_GAUGES, KV_USAGE)) or waited > timeout_s:
            return values, waited
        await asyncio.sleep(0.2)


def stop_server(proc: subprocess.Popen, limit_s: float, log_path: Path) -> dict[str, Any]:
    """SIGTERM, then how long the process took to exit (None: not within `limit_s`) and whether it
    was uvicorn's graceful shutdown: after it, uvicorn raises the signal again, so a clean exit shows
    as killed by SIGTERM (-15), which alone cannot tell it from no handler at all."""
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "exit_s": None, "limit_s": limit_s, "graceful": False}
    graceful = proc.returncode in (0, -signal.SIGTERM) and GRACEFUL_EXIT_LINE in log_path.read_text()
    return {"returncode": proc.returncode, "exit_s": time.perf_counter() - start, "limit_s": limit_s,
            "graceful": graceful}


def raise_fd_limit() -> None:
    """Thousands of open streams at 1.5x capacity: lift the common 1,024-descriptor soft limit (the
    server inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# -- the run ---------------------------------------------------------------------------------
async def load(args: argparse.Namespace, base_url: str, proc: subprocess.Popen, log_path: Path) -> dict[str, Any]:
    """Start-up to idle after the load: the outcomes and what the server said before and after."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        await wait_healthy(client, base_url, proc, args.startup_timeout, log_path)
        model, context = await served_model(client, base_url, None)
        context = context or args.max_model_len
        if not context:
            raise SoakError("/v1/models reports no max_model_len: pass --max-model-len")
        try:
            writer = await PromptWriter.calibrate(client, base_url + COMPLETIONS, model, chat=False)
        except RuntimeError as exc:  # the probe request failed: the server cannot serve at all
            raise SoakError(str(exc)) from exc
        jobs = plan(args, model, context, writer)
        before = await scrape(client, base_url)  # after the calibration probes, which the deltas leave out
        with progress_bar(console) as progress:
            task = progress.add_task(f"soak at {args.request_rate:g} req/s", total=len(jobs))
            outcomes = await run_jobs(client, base_url, jobs, args.duration + args.drain_timeout,
                                      lambda: progress.advance(task))
        alive = proc.poll() is None
        after, settle_s = await settle(client, base_url, args.settle_timeout)
        status = await health(client, base_url)
    return {"model": model, "context": context, "outcomes": outcomes, "alive_after_load": alive,
            "metrics_before": before, "metrics_after": after, "settle_s": settle_s, "health": status}


def tally(outcomes: list[Outcome]) -> tuple[dict, dict, dict]:
    """(results per kind, statuses per kind and variant, a few details per result)."""
    counts = {kind: dict.fromkeys(RESULTS, 0) for kind in KINDS}
    statuses: dict[str, dict[str, Counter]] = {kind: defaultdict(Counter) for kind in KINDS}
    examples: dict[str, list[str]] = defaultdict(list)
    for out in outcomes:
        counts[out.job.kind][out.result] += 1
        statuses[out.job.kind][out.job.variant][str(out.status or out.result)] += 1
        if out.result not in (COMPLETED, DISCONNECTED, OVERLOADED) and len(examples[out.result]) < 5:
            examples[out.result].append(f"{out.job.kind}/{out.job.variant}: {out.status} {out.detail}"[:400])
    return counts, {k: {v: dict(c) for v, c in d.items()} for k, d in statuses.items()}, dict(examples)


def unexpected(outcomes: list[Outcome]) -> Counter[str]:
    """Answers a kind must not get: a normal request refused, a bad one accepted, oversize not a 400.
    (Lost, broken and 5xx answers have their own checks.)"""
    wrong: Counter[str] = Counter()
    for out in outcomes:
        if out.result in (LOST, BROKEN, SERVER_ERROR):
            continue
        if out.result not in ALLOWED[out.job.kind] or (out.job.kind == "oversize" and out.status != 400):
            wrong[f"{out.job.kind} {out.result}"] += 1
    return wrong


def _delta(report: dict, key: str) -> float:
    return report["metrics_after"].get(key, math.nan) - report["metrics_before"].get(key, math.nan)


def _kv_check(report: dict) -> tuple[bool, str]:
    after = report["metrics_after"]
    free, total, usage = after.get(FREE_BLOCKS), after.get(TOTAL_BLOCKS), after.get(KV_USAGE)
    if None in (free, total, usage):
        return False, f"/metrics lacks {FREE_BLOCKS}, {TOTAL_BLOCKS} or {KV_USAGE}"
    return free == total and usage == 0.0, f"{free:.0f} free of {total:.0f}, usage {usage:.4f}"


def _finished_delta(report: dict) -> float:
    """Requests the server finished (stop or length) during the load; a reason it never used is absent."""
    keys = [f"nexus_requests_total{{finished_reason={reason}}}" for reason in ("length", "stop")]
    return sum(_delta(report, k) if k in report["metrics_before"] else report["metrics_after"].get(k, 0.0)
               for k in keys)


def evaluate(report: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, the value behind it) for every check of the module docstring."""
    total = Counter()
    for per_kind in report["counts"].values():
        total.update(per_kind)
    wrong = unexpected(report["outcomes"])
    after = report["metrics_after"]
    finished = _finished_delta(report)
    rejected = _delta(report, "nexus_requests_rejected_total")
    idle = all(after.get(k) == 0.0 for k in IDLE_GAUGES)
    shutdown = report["shutdown"]
    exit_text = (f"code {shutdown['returncode']} after {shutdown['exit_s'] or math.inf:.1f} s "
                 f"(limit {shutdown['limit_s']:.0f} s)")
    return [
        ("server alive after the load", report["alive_after_load"], str(report["alive_after_load"])),
        ("lost requests", total[LOST] == 0, str(total[LOST])),
        ("5xx other than 503", total[SERVER_ERROR] == 0, str(total[SERVER_ERROR])),
        ("broken 200 answers", total[BROKEN] == 0, str(total[BROKEN])),
        ("answers as each kind expects", not wrong, ", ".join(f"{k}: {n}" for k, n in wrong.items()) or "all"),
        ("normal requests completed", report["counts"]["normal"][COMPLETED] > 0,
         str(report["counts"]["normal"][COMPLETED])),
        ("server idle after the load", idle, f"after {report['settle_s']:.1f} s: " +
         ", ".join(f"{k.removeprefix('nexus_')} {after.get(k, math.nan):g}" for k in IDLE_GAUGES)),
        ("every KV block back", *_kv_check(report)),
        ("503s: server count = client count", rejected == total[OVERLOADED],
         f"{rejected:g} = {total[OVERLOADED]}"),
        # The server counts a request finished that a storm client left after its last token, too.
        ("finished: completed <= server count <= + disconnected",
         total[COMPLETED] <= finished <= total[COMPLETED] + total[DISCONNECTED],
         f"{total[COMPLETED]} <= {finished:g} <= {total[COMPLETED] + total[DISCONNECTED]}"),
        ("/health after the load", report["health"] == 200, str(report["health"])),
        ("graceful exit after SIGTERM, in time", shutdown["graceful"], exit_text),
    ]


def print_report(counts: dict, statuses: dict, checks: list[tuple[str, bool, str]]) -> None:
    table = Table(title="Soak: requests by kind")
    table.add_column("kind", style="bold")
    table.add_column("sent", justify="right")
    for result in RESULTS:
        table.add_column(result, justify="right")
    table.add_column("statuses")
    for kind in KINDS:
        by_status = Counter()
        for per_variant in statuses[kind].values():
            by_status.update(per_variant)
        table.add_row(kind, str(sum(counts[kind].values())), *(str(counts[kind][r]) for r in RESULTS),
                      " ".join(f"{s}x{n}" for s, n in sorted(by_status.items())))
    console.print(table)
    verdicts = Table(title="Soak: checks")
    for column in ("check", "value", "verdict"):
        verdicts.add_column(column)
    for name, ok, value in checks:
        verdicts.add_row(name, value, "[green]PASS" if ok else "[red]FAIL")
    console.print(verdicts)


def write_json(path: Path, report: dict, statuses: dict, examples: dict, checks: list) -> None:
    data = {key: value for key, value in report.items() if key != "outcomes"}
    data.update(statuses=statuses, examples=examples, sent=len(report["outcomes"]),
                checks=[{"check": n, "passed": ok, "value": v} for n, ok, v in checks],
                passed=all(ok for _, ok, _ in checks))
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset or checkpoint folder, as `serve --model`")
    p.add_argument("--policy", default="nexus")
    p.add_argument("--device", default="auto")
    p.add_argument("--request-rate", type=float, required=True,
                   help="requests/s: 1.5x the nexus capacity benchmarks/capacity.py measured")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    p.add_argument("--dataset", default="mixed", choices=DATASETS)
    p.add_argument("--dataset-path", help="ShareGPT JSON for --dataset sharegpt")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-share", type=float, default=0.5, help="share sent to /v1/chat/completions")
    p.add_argument("--stream-share", type=float, default=0.8, help="share streamed")
    p.add_argument("--disconnect-share", type=float, default=0.05)
    p.add_argument("--storm-size", type=int, default=32, help="disconnecting clients sent and cut at once")
    p.add_argument("--storm-hold", type=float, default=2.0, help="seconds from a storm's send to its cut")
    p.add_argument("--oversize-share", type=float, default=0.02)
    p.add_argument("--malformed-share", type=float, default=0.02)
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds after --duration by which every answer must have come (else: lost)")
    p.add_argument("--settle-timeout", type=float, default=60.0, help="seconds for the server to go idle after")
    p.add_argument("--startup-timeout", type=float, default=1200.0, help="seconds for /health to answer 200")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S, help="passed to serve")
    p.add_argument("--profile")
    p.add_argument("--slo")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    args = p.parse_args(argv)
    if not (args.request_rate > 0 and math.isfinite(args.request_rate) and args.duration > 0):
        p.error("--request-rate and --duration must be positive and finite")
    shares = (args.chat_share, args.stream_share, args.disconnect_share, args.oversize_share, args.malformed_share)
    if not all(0 <= share <= 1 for share in shares) or sum(shares[2:]) > 1:
        p.error("every share must lie in [0, 1], and the disconnect, oversize and malformed shares add up to <= 1")
    if args.storm_size < 1:
        p.error("--storm-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    port, log_path = free_port(), out / "soak-server.log"
    cmd = serve_command(args, port)
    proc = start_server(cmd, log_path)
    try:
        report = asyncio.run(load(args, f"http://127.0.0.1:{port}", proc, log_path))
        report["shutdown"] = stop_server(proc, args.shutdown_timeout + ABORT_GRACE_S + EXIT_SLACK_S, log_path)
    except SoakError as exc:
        console.print(f"[red]error:[/] {exc}")
        (out / "soak.json").write_text(json.dumps({"server_command": cmd, "error": str(exc)}, indent=1))
        return 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report.update(config=vars(args), server_command=cmd)
    report["counts"], statuses, examples = tally(report["outcomes"])
    checks = evaluate(report)
    print_report(report["counts"], statuses, checks)
    write_json(out / "soak.json", report, statuses, examples, checks)
    console.print(f"Results written to {out / 'soak.json'}, the server's log to {log_path}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
