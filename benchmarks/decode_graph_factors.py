"""Which runner setting makes an engine's decode graph slower than model_roofline.py's at the same step.

    PYTHONPATH=. python benchmarks/decode_graph_factors.py --out $OUT     (about a minute on an H200)

model_roofline.py builds its runner for the one step it times: KV blocks for that batch only, block
tables as wide as the context (2,064 tokens) and graph buckets up to 64 rows. An engine's runner
(engine_overhead.py) fills the card with KV blocks, takes max_model_len 4096 and max_num_seqs 256. Each
variant below changes one of those settings (max_model_len also to 8192 and the model's own), the last
all of them; every variant replays the same decode step (64 x 2048 KV, each sequence on consecutive
blocks) from its whole-GPU CUDA graph, and a torch.profiler pass over graph replays splits the step by
kernel kind. llama-3.1-8b, random weights. On the H200 this found max_model_len 4096 costing 0.45 ms
(5%) of the step, all in the decode attention: the split bound it sets changed the compiled kernel's
registers (108 or 153 a thread, so 4 or 3 programs per SM) until DecodeConfig.max_registers pinned them
(docs/performance.md, 2026-12-02 fourth session).
Writes decode_graph_factors.json under --out and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model_roofline import ceilings, decode_breakdown, decode_floor_ms, decode_step, time_ms
from nexus_tune.core.device import software_versions
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.kernels import num_kv_splits
from nexus_tune.engine.model_runner import ModelRunner


def variants(batch: int, kv: int) -> dict[str, dict[str, Any]]:
    """ModelRunner settings: model_roofline.py's, each engine setting alone, and the engine's."""
    roofline = {"num_kv_blocks": batch * -(-kv // 16), "max_model_len": kv + 16, "max_num_seqs": batch}
    engine = {"num_kv_blocks": None, "max_model_len": 4096, "max_num_seqs": 256}
    out = {"model_roofline": roofline}
    for name, value in engine.items():
        out[f"{name}={value or 'fill the card'}"] = {**roofline, name: value}
    for width in (8192, 131072):  # the split bound (17 at 64 rows) against 4096's (16); the model's own context
        out[f"max_model_len={width}"] = {**roofline, "max_model_len": width}
    out["engine (all three)"] = engine
    return out


def measure(model: str, settings: dict[str, Any], batch: int, kv: int, whole: torch.cuda.Stream,
            copy_gbps: float) -> dict[str, Any]:
    runner = ModelRunner(model, **settings)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    runner.capture_graphs({}, {"whole": (whole, None)}, sms, decode_buckets=[batch])
    step = decode_step(runner, batch, kv)
    graphs = runner.graph_set("decode")
    bucket = graphs.bucket("whole", batch)
    out = {"settings": settings, "num_kv_blocks": runner.num_kv_blocks,
           "split_bound": num_kv_splits(batch, runner.config.num_key_value_heads, runner.max_model_len, sms),
           "graph_ms": time_ms(lambda: runner.decode(step, "whole"), iters=20, stream=whole),
           "library": graphs.library("whole", bucket), "library_ms": graphs.library_ms["whole"][bucket],
           "floor_ms": decode_floor_ms(runner.config, batch, kv, copy_gbps)["floor_ms"]}
    out["kernels_ms"], _ = decode_breakdown(runner, step, whole, key="whole")
    del runner, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kv", type=int, default=2048, help="KV tokens per sequence")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("decode_graph_factors needs a CUDA GPU", file=sys.stderr)
        return 1
    ceil = ceilings()
    whole = SplitTable(0, backend="green-contexts").whole
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "versions": software_versions(), "model": args.model,
                           "batch": args.batch, "kv": args.kv, "copy_gbps": ceil["copy_gbps"], "variants": {}}
    for name, settings in variants(args.batch, args.kv).items():
        res["variants"][name] = r = measure(args.model, settings, args.batch, args.kv, whole, ceil["copy_gbps"])
        print(f"{name}: {r['graph_ms']:.3f} ms", flush=True)
    table = Table(title=f"decode {args.batch} x {args.kv} graph on {res['gpu']}, {args.model}")
    for col in ("runner", "KV blocks", "split bound", "graph ms (x HBM floor)", "library (cuBLAS / Lt at capture)", "kernels ms by kind"):
        table.add_column(col)
    for name, r in res["variants"].items():
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["kernels_ms"].items(), key=lambda kv: -kv[1]))
        lib = " / ".join(f"{v:.2f}" for v in r["library_ms"].values())
        table.add_row(name, str(r["num_kv_blocks"]), str(r["split_bound"]), f"{r['graph_ms']:.3f} ({r['graph_ms'] / r['floor_ms']:.3f}x)", f"{r['library']} ({lib})", kinds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_graph_factors.json").write_text(json.dumps(res, indent=2, default=str))
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
