"""Where an engine decode step's time goes, against the profile's decode measurement (issue 7).

    PYTHONPATH=. python benchmarks/decode_gap.py --model llama-3.1-8b --out $OUT

The paper_eval runs (docs/results.md) found the engine's decode steps 1.2-1.55x the profile's
prediction for the same batch and KV tokens, while prefill steps agree within 10%. This times
the same step (every sequence `ctx` tokens long) several ways on one plain stream, each the
median of --runs from an idle stream, events around the host call as the engine and profiler do:

  profile     the profiler's decode callable (runner.decode_fn: a graph of exactly `batch` rows,
              block table as wide as the sequences, blocks consecutive)
  predicted   the profile's LatencyModel at the whole GPU
  replay      the engine's bucket graph alone (inputs already loaded)
  decode      runner.decode(): host arrays, input copies, graph replay
  step        decode + greedy sampling + ids to pinned host memory, as engine/loops.py runs it
  scattered   step, with each sequence's blocks spread over the cache as a busy engine leaves them
  skewed      step, same batch and KV tokens, but one sequence holds half of them (a long
              document among chat turns: split-KV attention waits for that sequence's splits)
  prep        host time of runner.decode's input preparation alone (numpy arrays, no GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from engine import sampling
from engine.model_runner import DecodeBatch, ModelRunner
from nexus_tune.device import identify
from nexus_tune.partition import SplitTable
from nexus_tune.profile import Profile, model_slug, profile_path
from nexus_tune.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
WAYS = ("profile", "replay", "decode", "step", "scattered", "skewed")


def median_ms(fn, stream: torch.cuda.Stream, runs: int) -> float:
    for _ in range(3):
        fn()
    stream.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tables_for(runner: ModelRunner, lens: list[int], scattered: bool, rng: random.Random) -> list[list[int]]:
    counts = [-(-n // runner.block_size) for n in lens]
    total = sum(counts)
    ids = (rng.sample(range(runner.num_kv_blocks), total) if scattered
           else list(range(runner.num_kv_blocks - total, runner.num_kv_blocks)))
    bounds = np.cumsum([0, *counts]).tolist()
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def skewed_lens(batch: int, ctx: int, longest: int) -> list[int]:
    """`batch` sequences, `batch * ctx` tokens in all, up to half of them (at most `longest`) in the first."""
    if batch == 1:
        return [ctx]
    first = min(batch * ctx // 2, longest)
    rest, extra = divmod(batch * ctx - first, batch - 1)
    return [first] + [rest + (i < extra) for i in range(batch - 1)]


def measure(runner: ModelRunner, stream: torch.cuda.Stream, batch: int, ctx: int, runs: int) -> dict[str, float]:
    rng = random.Random(0)
    ids = [rng.randrange(runner.config.vocab_size) for _ in range(batch)]
    out: dict[str, float] = {}
    profile_fn = runner.decode_fn(batch, batch * ctx, "all", stream)
    out["profile"] = median_ms(lambda: profile_fn(stream), stream, runs)

    def engine_step(b: DecodeBatch, sample: bool):
        def run() -> None:
            logits = runner.decode(b, key="whole")
            if sample:
                with torch.cuda.stream(stream):
                    host.copy_(sampling.sample(logits, [GREEDY] * batch, [0] * batch), non_blocking=True)
        return run

    host = torch.empty(batch, dtype=torch.int64, pin_memory=True)
    dense = DecodeBatch(ids, [ctx - 1] * batch, tables_for(runner, [ctx] * batch, False, rng))
    spread = DecodeBatch(ids, [ctx - 1] * batch, tables_for(runner, [ctx] * batch, True, rng))
    lens = skewed_lens(batch, ctx, runner.max_model_len - 1)
    skewed = DecodeBatch(ids, [n - 1 for n in lens], tables_for(runner, lens, False, rng))
    bucket = next(b for b in runner._graph_buckets["whole"] if b >= batch)
    runner.decode(dense, key="whole")  # loads the static inputs the bare replay reads
    graph = runner._graphs["whole", bucket]

    def replay() -> None:
        with torch.cuda.stream(stream):
            graph.replay()
    out["replay"] = median_ms(replay, stream, runs)
    out["decode"] = median_ms(engine_step(dense, sample=False), stream, runs)
    out["step"] = median_ms(engine_step(dense, sample=True), stream, runs)
    out["scattered"] = median_ms(engine_step(spread, sample=True), stream, runs)
    out["skewed"] = median_ms(engine_step(skewed, sample=True), stream, runs)
    t0 = time.perf_counter()
    for _ in range(runs):
        runner._decode_arrays(dense, bucket)
    out["prep"] = (time.perf_counter() - t0) * 1e3 / runs
    t0 = time.perf_counter()
    for _ in range(runs):
        engine_step(dense, sample=True)()
        stream.synchronize()
    out["step_wall"] = (time.perf_counter() - t0) * 1e3 / runs
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--ctx", default="1024,4096")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--decode-sms", type=int, help="run on the green-context split with this many decode SMs "
                   "(default: the whole GPU on a plain stream)")
    p.add_argument("--max-model-len", type=int, default=16384, help="as the engine ran (graph block-table width)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("decode_gap.py needs a CUDA GPU", file=sys.stderr)
        return 2
    path = profile_path(identify(0).slug, args.model)
    model = Profile.load(path).latency_model
    runner = ModelRunner(args.model, device="cuda", max_model_len=args.max_model_len, max_num_seqs=256,
                         gpu_memory_utilization=0.85)
    total = torch.cuda.get_device_properties(0).multi_processor_count
    splits = SplitTable(0) if args.decode_sms else None
    stream = (next(s.decode_stream for s in splits if s.decode_sms == args.decode_sms) if splits
              else torch.cuda.Stream())
    sms = args.decode_sms or total
    runner.capture_decode_graphs({"whole": stream})
    table = Table(title=f"{args.model}: decode step on {sms} SMs, ms (median of {args.runs}), "
                        f"{torch.cuda.get_device_name(0)}")
    for col in ("batch", "ctx", "predicted", *WAYS, "prep", "step wall", "step / predicted"):
        table.add_column(col, justify="right")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.ctx.split(",")):
            r = measure(runner, stream, batch, ctx, args.runs)
            r.update(batch=batch, ctx=ctx, sms=sms, predicted=model.predict_decode(batch, batch * ctx, sms))
            rows.append(r)
            table.add_row(str(batch), str(ctx), f"{r['predicted']:.2f}", *(f"{r[w]:.2f}" for w in WAYS),
                          f"{r['prep']:.2f}", f"{r['step_wall']:.2f}", f"{r['step'] / r['predicted']:.2f}x")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_gap_{model_slug(args.model)}_{sms}sms.json").write_text(json.dumps(
        {"model": args.model, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
         "profile": str(path), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
