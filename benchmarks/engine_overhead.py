"""What an engine step costs beyond its device work, per step kind, on the whole GPU and on a split.

    PYTHONPATH=. python benchmarks/engine_overhead.py --out $OUT

The engine (nexus_tune/engine/loops.py) schedules and launches step n+1 while the GPU runs step n, and every
step replays a CUDA graph. This measures what is left, from the engine's own step log (CUDA events
on each loop's stream), llama-3.1-8b with random weights:

- decode, chunked policy on the whole GPU, B sequences of `ctx` tokens decoding (B = 1, 16, 64 at
  2048 tokens, 256 at 512): the cycle (start to start of consecutive decode steps on the GPU
  timeline) against the device work alone (the same step's input copy, graph, sampling and ids to
  the host, replayed back to back by the runner; and the graph alone) and against the HBM floor. The host time on the
  critical path is cycle - device work (target <= 0.3 ms at any batch up to 256); the whole step
  at 64 x 2048 within 1.15x the floor.
- mixed steps of chunked: 512-token prompts arriving while 64 sequences decode, against the
  step's roofline (FLOPs at the matmul rate or bytes at the copy bandwidth, measured in this run;
  target 1.3x), and the step's fixed cost (cycle - device time, target <= 2 ms); prefill steps too.
- the two loops on a real split (static:64, green contexts): decode steps beside prefill steps of
  2048-token prompts, their cycles against their graphs.
Writes engine_overhead.json under --out and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_roofline import ceilings, decode_floor_ms, step_roofline_ms, step_serial_floor_ms, time_ms
from nexus_tune.engine.llm import LLM
from nexus_tune.engine.loops import StepRecord
from nexus_tune.engine.sampling import sample
from nexus_tune.engine.step_inputs import DecodeInput
from nexus_tune.core.device import software_versions
from nexus_tune.core.sequence import SamplingParams

HOST_TARGET_MS = 0.3
DECODE_FLOOR_TARGET = 1.15
MIXED_ROOFLINE_TARGET = 1.3
FIXED_TARGET_MS = 2.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    p.add_argument("--decode-steps", type=int, default=40, help="decode steps per batch size")
    p.add_argument("--split", type=int, default=64, help="prefill SMs of the two-loop run")
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="the engines' context; it sets the block tables' width and the decode attention's split "
                        "bound (decode_graph_factors.py times the decode graph across it)")
    return p.parse_args()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=gen).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def decode_cycles(steps: list[StepRecord], batch: int) -> dict[str, Any]:
    """Consecutive decode steps of exactly `batch` rows: start-to-start cycle and event span, ms."""
    dec = [s for s in steps if s.kind == "decode" and s.num_seqs == batch and s.start_ms is not None]
    cycles = [b.start_ms - a.start_ms for a, b in zip(dec, dec[1:])]
    return {"steps": len(dec), "cycle_ms": median(cycles[2:] or cycles), "span_ms": median([s.gpu_ms for s in dec]),
            "kv_tokens": median([s.decode_kv for s in dec])}


def device_decode_ms(llm: LLM, batch: int, ctx: int, sampled: bool = True) -> float:
    """The decode step's device work with the host never in the way: the runner's step (input copy,
    graph, and with `sampled` greedy sampling and ids to pinned memory) replayed back to back on the
    whole-GPU stream."""
    core = llm.core
    runner, stream = core.runner, core.placement.stream("decode", core.placement.total_sms)
    blocks = -(-ctx // runner.block_size)
    step = DecodeInput([1] * batch, [ctx - 1] * batch, [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)],
                       keys=list(range(batch)))
    host = torch.empty(batch, dtype=torch.int64, pin_memory=True)
    key = core.placement.key(core.placement.total_sms)

    def one() -> None:
        logits = runner.decode(step, key)
        if sampled:
            host.copy_(sample(logits, [greedy(1)] * batch, [0] * batch), non_blocking=True)
    return time_ms(one, iters=20, stream=stream)


def decode_runs(llm: LLM, ceil: dict[str, float], n_steps: int) -> list[dict[str, Any]]:
    rows = []
    vocab = llm.core.runner.config.vocab_size
    for batch, ctx in ((1, 2048), (16, 2048), (64, 2048), (256, 512)):
        before = len(llm.core.step_records())
        llm.generate(prompts(batch, ctx, vocab, batch), greedy(n_steps))
        steps = llm.core.step_records()[before:]
        r = decode_cycles(steps, batch)
        mid = ctx + n_steps // 2
        r.update(batch=batch, ctx=ctx, device_ms=device_decode_ms(llm, batch, mid),
                 graph_ms=device_decode_ms(llm, batch, mid, sampled=False))
        # At exactly `ctx` KV tokens (the run's steps hold ctx + 1 .. ctx + n_steps): the attention's
        # split of a sequence is a whole number of KV tiles, so a length past a tile boundary costs more.
        r["graph_ms_at_ctx"] = device_decode_ms(llm, batch, ctx, sampled=False)
        r["floor_ms_at_ctx"] = decode_floor_ms(llm.core.runner.config, batch, ctx, ceil["copy_gbps"])["floor_ms"]
        r["host_critical_ms"] = r["cycle_ms"] - r["device_ms"] if r["cycle_ms"] else None
        r["floor_ms"] = decode_floor_ms(llm.core.runner.config, batch, mid, ceil["copy_gbps"])["floor_ms"]
        r["cycle_vs_floor"] = r["cycle_ms"] / r["floor_ms"] if r["cycle_ms"] else None
        graphs, key = llm.core.runner.graph_set("decode"), llm.core.placement.key(llm.core.placement.total_sms)
        bucket = graphs.bucket(key, batch)
        r["graph"] = {"bucket": bucket, "library": graphs.library(key, bucket), "library_ms": graphs.library_ms[key][bucket]}
        rows.append(r)
    return rows


def mixed_run(llm: LLM, ceil: dict[str, float], arrivals: int = 6) -> dict[str, Any]:
    """64 sequences of 2048 tokens decode; 512-token prompts arrive one at a time: mixed steps."""
    core = llm.core
    config = core.runner.config
    before = len(core.step_records())
    done = threading.Event()
    remaining = [64 + arrivals]

    def route(outs: list[Any]) -> None:
        remaining[0] -= sum(o.finished for o in outs)
        if remaining[0] <= 0:
            done.set()
    core.start()
    try:
        for i, ids in enumerate(prompts(64, 2048, config.vocab_size, 7)):
            core.add(f"long-{i}", ids, greedy(400), route)
        while core.stats()["waiting"] or core.scheduler.stats()["num_prefilling"]:
            time.sleep(0.01)
        time.sleep(0.1)  # a few pure decode steps
        for i, ids in enumerate(prompts(arrivals, 512, config.vocab_size, 8)):
            core.add(f"short-{i}", ids, greedy(1), route)
            time.sleep(0.08)
        done.wait(120)
    finally:
        core.stop()
    steps = core.step_records()[before:]
    rate, bw = ceil["matmul_tflops"], ceil["copy_gbps"]
    out: dict[str, Any] = {}
    kinds = {"mixed 512 + 64": lambda s: s.kind == "mixed" and s.prefill_tokens == 512 and s.decode_seqs == 64,
             "mixed": lambda s: s.kind == "mixed", "prefill": lambda s: s.kind == "prefill"}
    for kind, wanted in kinds.items():
        picked = [(i, s) for i, s in enumerate(steps) if wanted(s)]
        # the GPU-timeline gap to the next step: the host's part of this step's cycle
        fixed = [steps[i + 1].start_ms - s.end_ms for i, s in picked if i + 1 < len(steps)]
        out[kind] = {"steps": len(picked),
                     "rows": median([s.prefill_tokens + s.decode_seqs for _, s in picked]),
                     "span_ms": median([s.gpu_ms for _, s in picked]),
                     "span_vs_roofline": median([s.gpu_ms / step_roofline_ms(config, s, rate, bw) for _, s in picked]),
                     "span_vs_serial_floor": median([s.gpu_ms / step_serial_floor_ms(config, s, rate, bw)
                                                     for _, s in picked]),
                     "gap_to_next_ms": median(fixed)}
    return out


def two_loop_run(model: str, split: int, n_steps: int, max_model_len: int) -> dict[str, Any]:
    """static:split on green contexts: 64 sequences decode while 2048-token prompts prefill beside them."""
    with LLM(model, policy=f"static:{split}", step_log=True, max_model_len=max_model_len) as llm:
        vocab = llm.core.runner.config.vocab_size
        llm.generate(prompts(4, 64, vocab, 1), greedy(4))  # warm-up
        before = len(llm.core.step_records())
        t0 = time.perf_counter()
        llm.generate(prompts(64, 256, vocab, 2) + prompts(12, 2048, vocab, 3), greedy(n_steps * 3))
        wall = time.perf_counter() - t0
        steps = llm.core.step_records()[before:]
        dec = [s for s in steps if s.kind == "decode"]
        beside = [s for s in dec if s.beside_prefill]
        alone = [s for s in dec if not s.beside_prefill]
        pre = [s for s in steps if s.kind == "prefill"]
        cycles = [b.start_ms - a.start_ms for a, b in zip(dec, dec[1:])]
        return {"policy": f"static:{split}", "backend": llm.core.table.backend, "wall_s": wall,
                "graphs": [str(r) for r in llm.core.graph_report or []],
                "decode_steps": len(dec), "decode_cycle_ms": median(cycles),
                "decode_span_beside_ms": median([s.gpu_ms for s in beside]),
                "decode_span_alone_ms": median([s.gpu_ms for s in alone]),
                "prefill_steps": len(pre), "prefill_tokens": median([s.prefill_tokens for s in pre]),
                "prefill_span_ms": median([s.gpu_ms for s in pre])}


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("engine_overhead needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "versions": software_versions(), "model": args.model,
                           "max_model_len": args.max_model_len}
    res["ceilings"] = ceil = ceilings()
    torch.cuda.empty_cache()
    with LLM(args.model, policy="chunked", step_log=True, max_model_len=args.max_model_len) as llm:
        res["capture"] = [str(r) for r in llm.core.graph_report]
        res["decode"] = decode_runs(llm, ceil, args.decode_steps)
        res["mixed"] = mixed_run(llm, ceil)
    torch.cuda.empty_cache()
    res["two_loops"] = two_loop_run(args.model, args.split, args.decode_steps, args.max_model_len)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_overhead.json").write_text(json.dumps(res, indent=2, default=str))

    table = Table(title=f"engine step costs on {res['gpu']}, {args.model}, max_model_len {args.max_model_len} ({res['seconds']:.0f} s)")
    for col in ("measurement", "result", "target"):
        table.add_column(col)
    for r in res["decode"]:
        table.add_row(f"decode {r['batch']} x {r['ctx']} (chunked, whole GPU)",
                      f"cycle {ms(r['cycle_ms'])} ms, device {ms(r['device_ms'])} ms (graph {ms(r['graph_ms'])}), "
                      "host on the critical path "
                      f"{ms(r['host_critical_ms'])} ms; {ms(r['cycle_vs_floor'])}x the HBM floor {ms(r['floor_ms'])} ms; "
                      f"at exactly {r['ctx']} KV tokens the graph {ms(r['graph_ms_at_ctx'])} ms = "
                      f"{ms(r['graph_ms_at_ctx'] / r['floor_ms_at_ctx'])}x its floor; "
                      f"graph {r['graph']['bucket']} on {r['graph']['library']} ("
                      + " / ".join(f"{lib} {t:.2f}" for lib, t in r["graph"]["library_ms"].items()) + " ms at capture)",
                      f"host <= {HOST_TARGET_MS} ms" + (f"; <= {DECODE_FLOOR_TARGET}x floor" if r["batch"] == 64 else ""))
    for kind, target in (("mixed 512 + 64", f"<= {MIXED_ROOFLINE_TARGET}x roofline, gap <= {FIXED_TARGET_MS} ms"),
                         ("mixed", f"gap <= {FIXED_TARGET_MS} ms"), ("prefill", f"gap <= {FIXED_TARGET_MS} ms")):
        m = res["mixed"][kind]
        if m["steps"]:
            table.add_row(f"{kind} steps of chunked ({m['steps']}, median {ms(m['rows'], 0)} rows)",
                          f"span {ms(m['span_ms'])} ms = {ms(m['span_vs_roofline'])}x roofline, "
                          f"{ms(m['span_vs_serial_floor'])}x the serial floor; gap to the next "
                          f"step {ms(m['gap_to_next_ms'])} ms", target)
    t = res["two_loops"]
    table.add_row(f"two loops, {t['policy']} ({t['backend']})",
                  f"decode cycle {ms(t['decode_cycle_ms'])} ms, span beside a prefill {ms(t['decode_span_beside_ms'])} "
                  f"ms, alone {ms(t['decode_span_alone_ms'])} ms; prefill {ms(t['prefill_tokens'], 0)} tokens "
                  f"{ms(t['prefill_span_ms'])} ms",
                  "")
    Console(width=220).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
