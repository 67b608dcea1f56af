"""Decode graphs by side and bucket: which batches replay a larger bucket's graph, and what that saves.

    PYTHONPATH=. python benchmarks/decode_buckets.py --models qwen2.5-3b --out $OUT/qwen   (a minute on an H200)

For each model (random bf16 weights): the decode graphs a `nexus` engine captures (the whole GPU and
every split's decode side), each bucket's replay time as `GraphSet` takes it at capture (padded rows
attend one scratch token), and the buckets that replay a larger, quicker graph
(nexus_tune/engine/cuda_graphs.py).
Then, for every replaced bucket, the engine's decode step (`ModelRunner.decode`: inputs copied in,
graph replayed) of that many sequences over --kv tokens each, timed with the replacement and with
the bucket's own graph. Writes decode_buckets.json and .md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.model_roofline import decode_step, time_ms
from nexus_tune.core.device import software_versions
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.engine.llm import EngineCore

MODELS = ("qwen2.5-3b", "llama-3.1-8b")


def bench_model(core: EngineCore, model: str, kv: int) -> dict[str, Any]:
    runner, graphs = core.runner, core.runner.graph_set("decode")
    report = next(r for r in core.graph_report if r.kind == "decode")
    sides = {key: graphs.stream(key) for key in graphs.replay_ms}
    out: dict[str, Any] = {"model": model, "capture": str(report), "kv": kv, "sides": {}}
    for key in sides:
        replaced = graphs.replaced[key]
        steps = {}
        for own, instead in replaced.items():
            step = decode_step(runner, own, kv)
            fast = time_ms(lambda: runner.decode(step, key), iters=10, stream=sides[key])
            graphs.replaced[key] = {}  # the bucket's own graph
            slow = time_ms(lambda: runner.decode(step, key), iters=10, stream=sides[key])
            graphs.replaced[key] = replaced
            steps[own] = {"replays": instead, "ms": fast, "own_graph_ms": slow}
            print(f"{model} side {key}: {own} seqs x {kv} KV replay bucket {instead}: {fast:.2f} ms, "
                  f"own graph {slow:.2f} ms ({slow / fast:.2f}x)", flush=True)
        out["sides"][str(key)] = {"replay_ms": graphs.replay_ms[key], "replaced": replaced, "steps": steps,
                                  "library": {b: graphs.library(key, b) for b in graphs.library_ms[key]}}
    return out


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Decode graphs replayed in a larger bucket ({res['device']}, {res['date']})", "",
             "| model | side (SMs) | bucket -> replayed | step ms, replayed / own graph | gain |", "|---|---|---|---|---|"]
    for m in res["models"]:
        for side, s in m["sides"].items():
            for own, step in s["steps"].items():
                lines.append(f"| {m['model']} | {side} | {own} -> {step['replays']} | {step['ms']:.2f} / "
                             f"{step['own_graph_ms']:.2f} | {step['own_graph_ms'] / step['ms']:.2f}x |")
    lines += ["", "Replay times at capture (ms), by side and bucket; * marks a graph kept on cuBLASLt (quicker than cuBLAS):", ""]
    for m in res["models"]:
        lines.append(f"- {m['model']} ({m['capture']}):")
        for side, s in m["sides"].items():
            lines.append(f"  - {side}: " + ", ".join(
                f"{b}: {ms:.2f}" + ("*" if s["library"][b] == "cublaslt" else "")
                for b, ms in s["replay_ms"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--kv", type=int, default=1024, help="KV tokens per sequence in the timed steps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_buckets needs a CUDA GPU", file=sys.stderr)
        return 2
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                           "software": software_versions(), "models": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        core = EngineCore(EngineConfig(model=model, policy="nexus", max_model_len=max(4096, args.kv + 16)))
        res["models"].append(bench_model(core, model, args.kv))
        # Written before the engine closes: on the H200 closing it crashed (cudaErrorDeviceUninitialized).
        (args.out / "decode_buckets.json").write_text(json.dumps(res, indent=1))
        (args.out / "decode_buckets.md").write_text(to_markdown(res))
        print(to_markdown(res), flush=True)
        core.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
