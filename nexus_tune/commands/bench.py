"""`nexus-tune bench`: an async HTTP load generator for any OpenAI-compatible server.

It follows vLLM's serving benchmark (`vllm bench serve`): requests arrive on a Poisson /
gamma schedule, each streams its completion (SSE) with `max_tokens` = the planned output
length and `ignore_eos` (a vLLM / SGLang extension) so that the length is as planned, and
the metrics and JSON field names are vLLM's (see metrics.py). `--sweep` repeats the run at
several rates and reports the capacity: the highest rate at which 90% of requests meet the SLOs.
"""
from __future__ import annotations
import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from nexus_tune.core import metrics
from nexus_tune.core.metrics import RequestRecord
from nexus_tune.core.workload import TraceRequest, make_trace
from nexus_tune.commands.reporting import plot_latency_vs_rate, progress_bar

# Four-letter words with a leading space: one token each in Llama / Qwen / GPT BPE vocabularies
# and five bytes each for a byte-level tokenizer, so a calibrated word count hits a token count.
WORDS = ("that with have this from they will what were when your said more some time into like "
         "them than only over also back just well even most such make good very long high").split()
HTTP_TIMEOUT = httpx.Timeout(6 * 3600.0)  # a long run's slowest request, as vLLM allows


@dataclass
class PromptWriter:
    """Text of a given token length, from the server's own token counts: tokens = base + per_word * words."""

    base: float = 0.0
    per_word: float = 1.0

    def text(self, tokens: int, rng: np.random.Generator) -> str:
        words = max(1, round((tokens - self.base) / self.per_word))
        return " ".join(rng.choice(WORDS, size=words))

    @classmethod
    async def calibrate(cls, client: httpx.AsyncClient, url: str, model: str, chat: bool) -> PromptWriter:
        """Two short non-streaming probes; their `usage.prompt_tokens` give the line.

        The first probe doubles as vLLM's initial test run: a server that cannot answer
        raises here, before the benchmark starts.
        """
        counts = []
        for words in (16, 80):
            body = request_body(model, " ".join(WORDS[i % len(WORDS)] for i in range(words)), 1, chat, stream=False)
            resp = await client.post(url, json=body)
            if resp.status_code != 200:
                raise RuntimeError(f"test request to {url} answered HTTP {resp.status_code}: {resp.text[:300]}")
            counts.append((resp.json().get("usage") or {}).get("prompt_tokens"))
        if None in counts or counts[1] <= counts[0]:
            return cls()  # no usage reported: assume one token per word
        per_word = (counts[1] - counts[0]) / (80 - 16)
        return cls(base=counts[0] - 16 * per_word, per_word=per_word)


def request_body(model: str, prompt: str, max_tokens: int, chat: bool, stream: bool = True) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def parse_event(line: str) -> dict | None:
    """The JSON of one SSE `data:` line; None for blank lines, comments and `[DONE]`."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    return None if data == "[DONE]" else json.loads(data)


def carries_token(event: dict, chat: bool) -> bool:
    """Whether a streamed chunk delivers a generated token.

    A chunk with text carries one; so does one with empty text and no finish reason (a
    token that ends mid-way through a multi-byte character). Not tokens: chat's opening
    role-only chunk, a closing chunk with a finish reason and nothing else, usage chunks.
    """
    choices = event.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = delta.get("content") if chat else choice.get("text")
    if text:
        return True
    return isinstance(text, str) and choice.get("finish_reason") is None and "role" not in delta


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord,
                         t0: float, chat: bool) -> RequestRecord:
    """Send one streaming request and fill `record` with every token's arrival (s since t0)."""
    usage = {}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {text[:300]}"
                return record
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                event = parse_event(line)
                if event is None:
                    continue
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    return record
                if carries_token(event, chat):
                    record.token_times_s.append(now)
                usage = event.get("usage") or usage
        record.finish_s = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if not record.token_times_s:
        record.error = "the stream carried no token"
        return record
    record.first_token_s = record.token_times_s[0]
    record.output_tokens = usage.get("completion_tokens") or len(record.token_times_s)
    record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
    record.success = True
    return record


async def drive(client: httpx.AsyncClient, url: str, model: str, trace: list[TraceRequest], writer: PromptWriter,
                chat: bool, max_concurrency: int | None, seed: int,
                on_done: Callable[[], None] = lambda: None) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival instant; (records, benchmark duration in s)."""
    rng = np.random.default_rng([seed, 2])
    prompts = [r.prompt if r.prompt is not None else writer.text(r.prompt_tokens, rng) for r in trace]
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()

    async def one(req: TraceRequest, prompt: str) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
        body = request_body(model, prompt, req.output_tokens, chat)
        if gate is not None:
            await gate.acquire()
        try:  # like vLLM, a request's clock starts when it is sent, after the concurrency gate
            record = RequestRecord(req.request_id, time.perf_counter() - t0, req.prompt_tokens)
            return await stream_request(client, url, body, record, t0, chat)
        finally:
            if gate is not None:
                gate.release()
            on_done()

    records = await asyncio.gather(*(one(r, p) for r, p in zip(trace, prompts)))
    return list(records), time.perf_counter() - t0


def result_json(records: list[RequestRecord], duration_s: float, slos: dict, config: dict) -> dict:
    """vLLM's result file: the run's settings, the metrics and the per-request detail lists."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **config,
        **metrics.summarize(records, duration_s, slos),
        "input_lens": [r.prompt_tokens for r in records],
        "output_lens": [r.output_tokens if r.done else 0 for r in records],
        "ttfts": [r.ttft_ms / 1e3 if r.done else 0.0 for r in records],
        "itls": [[g / 1e3 for g in r.itls_ms] for r in records],
        "errors": [r.error for r in records],
    }


def print_result(result: dict, console: Console) -> None:
    table = Table(title="Serving benchmark result", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("Successful requests", str(result["completed"]))
    table.add_row("Failed requests", str(result["failed"]))
    table.add_row("Benchmark duration (s)", f"{result['duration']:.2f}")
    table.add_row("Total input tokens", str(result["total_input_tokens"]))
    table.add_row("Total generated tokens", str(result["total_output_tokens"]))
    table.add_row("Request throughput (req/s)", f"{result['request_throughput']:.2f}")
    if result["request_goodput"] is not None:
        table.add_row("Request goodput (req/s)", f"{result['request_goodput']:.2f}")
        table.add_row("SLO attainment", f"{result['slo_attainment']:.1%}")
    table.add_row("Output token throughput (tok/s)", f"{result['output_throughput']:.2f}")
    table.add_row("Total token throughput (tok/s)", f"{result['total_token_throughput']:.2f}")
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        cells = [f"{result[f'{s}_{name}_ms']:.2f}" for s in ("mean", "median", "p90", "p99")]
        table.add_row(f"{label} mean / median / p90 / p99 (ms)", " / ".join(cells))
    console.print(table)


async def served_model(client: httpx.AsyncClient, base_url: str, name: str | None) -> tuple[str, int | None]:
    """The model to request (`name`, else the server's first) and its context length when /v1/models
    reports one (vLLM and nexus-tune do, as `max_model_len`)."""
    resp = await client.get(f"{base_url}/v1/models")
    if resp.status_code != 200:
        if name:
            return name, None
        raise RuntimeError(f"{base_url}/v1/models answered HTTP {resp.status_code}; pass --model")
    models = resp.json().get("data") or []
    if not name and not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    name = name or models[0]["id"]
    listed = next((m for m in models if m.get("id") == name), {})
    return name, listed.get("max_model_len")


def check_context(trace: list[TraceRequest], max_model_len: int, console: Console) -> None:
    """Refuse a run none of whose requests fit the server's context; warn when some do not."""
    too_long = [r for r in trace if r.prompt_tokens + r.output_tokens > max_model_len]
    if not too_long:
        return
    longest = max(too_long, key=lambda r: r.prompt_tokens + r.output_tokens)
    text = (f"{len(too_long)} of {len(trace)} requests need more than the server's context of {max_model_len} "
            f"tokens (up to {longest.prompt_tokens} prompt + {longest.output_tokens} output)")
    if len(too_long) == len(trace):
        raise ValueError(f"{text}: lower --random-input-len / --random-output-len, pick another --dataset, "
                         "or serve a longer --max-model-len")
    console.print(f"[yellow]warning:[/] {text}; those will fail")


async def _bench(args, slos: dict[str, float], rates: list[float], console: Console) -> list[dict]:
    base_url = args.base_url.rstrip("/")
    url = base_url + args.endpoint
    chat = args.endpoint.rstrip("/").endswith("chat/completions")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # Traces at different rates hold the same requests (workload.make_trace), so one context check does.
    traces = [make_trace(args.dataset, args.num_prompts, rate, args.burstiness, args.seed, args.dataset_path,
                         args.random_input_len, args.random_output_len) for rate in rates]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        model, max_model_len = await served_model(client, base_url, args.model)
        if max_model_len:
            check_context(traces[0], max_model_len, console)
        writer = await PromptWriter.calibrate(client, url, model, chat)
        results = []
        for rate, trace in zip(rates, traces):
            with progress_bar(console) as progress:
                task = progress.add_task(f"rate {rate:g} req/s", total=len(trace))
                records, duration = await drive(client, url, model, trace, writer, chat, args.max_concurrency,
                                                args.seed, lambda: progress.advance(task))
            config = {"backend": "openai-chat" if chat else "openai", "model_id": model, "dataset": args.dataset,
                      "num_prompts": args.num_prompts, "request_rate": rate if math.isfinite(rate) else "inf",
                      "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "slos": slos}
            results.append(result_json(records, duration, slos, config))
            print_result(results[-1], console)
    return results


def _print_sweep(results: list[dict], cap: float | None, slos: dict, console: Console) -> None:
    table = Table(title=f"Sweep under {', '.join(f'{k} <= {v:g} ms' for k, v in slos.items())}")
    for col in ("rate (req/s)", "throughput", "goodput", "SLO met", "TTFT p50/p99 (ms)", "TPOT p50/p99 (ms)"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['request_rate']:g}", f"{r['request_throughput']:.2f}", f"{r['request_goodput']:.2f}",
                      f"{r['slo_attainment']:.1%}", f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}",
                      f"{r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f}")
    console.print(table)
    console.print(f"Capacity: {cap:g} req/s" if cap is not None else
                  f"Capacity: below {results[0]['request_rate']:g} req/s (no rate met the SLOs for 90% of requests)")


def run_bench(args) -> int:
    from nexus_tune.commands.cli import report_error

    console = Console()
    try:
        slos = metrics.parse_slos(args.goodput)
        rates = sorted(args.sweep) if args.sweep else [args.request_rate]
        if args.sweep and not slos:
            raise ValueError("--sweep finds the capacity under SLOs: give them with --goodput ttft:MS tpot:MS")
        if args.plot and not args.sweep:
            raise ValueError("--plot draws latency against rate: it needs --sweep")
        results = asyncio.run(_bench(args, slos, rates, console))
    except (ValueError, RuntimeError) as e:
        report_error(str(e))
        return 2
    except httpx.HTTPError as e:
        report_error(f"cannot reach {args.base_url}: {type(e).__name__}: {e}")
        return 1
    out: dict | list = results[0]
    if args.sweep:
        cap = metrics.capacity({r["request_rate"]: r["slo_attainment"] for r in results})
        _print_sweep(results, cap, slos, console)
        out = {"capacity": cap, "slos": slos, "runs": results}
        if args.plot:
            plot_latency_vs_rate({"server": [(r["request_rate"], r) for r in results]}, slos, args.plot,
                                 {"server": cap})
            console.print(f"Plot written to {args.plot}")
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(out, indent=1), encoding="utf-8")
        console.print(f"Results written to {args.result_file}")
    if not any(r["completed"] for r in results):  # a broken setup, not a measurement
        first = next((e for r in results for e in r["errors"] if e), "(no error message)")
        report_error(f"every request failed; the first: {first}")
        return 1
    return 0
