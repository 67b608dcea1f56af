"""Exploration (not landed): decode attention configs inside the engine's decode graph.

The engine's runner (cards-full KV, max_model_len 4096, 256 rows), one 64 x 2048 step; for each
DecodeConfig the decode graphs are re-captured on the whole GPU and on the 92-SM decode side, the
step's graph timed on both, and the whole-GPU graph split by kernel kind.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

from benchmarks.model_roofline import ceilings, decode_breakdown, decode_floor_ms, decode_step, time_ms
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.kernels import DecodeConfig, decode_attention
from nexus_tune.engine.model_runner import ModelRunner

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
D = DecodeConfig
configs = {
    "default": D(),
    "pps4": D(programs_per_sm=4), "pps6": D(programs_per_sm=6), "pps12": D(programs_per_sm=12),
    "pps16": D(programs_per_sm=16),
    "st2": D(num_stages=2), "st4": D(num_stages=4),
    "n32": D(block_n=32), "n32st4": D(block_n=32, num_stages=4),
    "n128st2": D(block_n=128, num_stages=2), "n128w8": D(block_n=128, num_warps=8, num_stages=2),
    "r96": D(max_registers=96), "r96pps10": D(max_registers=96, programs_per_sm=10),
    "r80pps12": D(max_registers=80, programs_per_sm=12),
    "w2r128": D(num_warps=2, max_registers=128),
}
ceil = ceilings()
table = SplitTable(0, backend="green-contexts")
total = table.total_sms
side = table[total - 92]
sides = {"whole": (table.whole, None), 92: (side.decode_stream, 92)}
runner = ModelRunner("llama-3.1-8b", num_kv_blocks=None, max_model_len=4096, max_num_seqs=256)
batch, kv = 64, 2048
step = decode_step(runner, batch, kv)
floor = decode_floor_ms(runner.config, batch, kv, ceil["copy_gbps"])["floor_ms"]
res = {"ceilings": ceil, "floor_ms": floor, "configs": {}}
fn = decode_attention
for name, cfg in configs.items():
    fn.__kwdefaults__["config"] = cfg
    try:
        runner.capture_graphs({}, sides, total, decode_buckets=[batch])
        r = {"config": dataclasses.asdict(cfg)}
        for key, (stream, _) in sides.items():
            r[f"graph_ms_{key}"] = time_ms(lambda k=key: runner.decode(step, k), iters=20, stream=stream)
        r["kernels_ms"], _ = decode_breakdown(runner, step, table.whole, key="whole")
    except Exception as exc:
        r = {"config": dataclasses.asdict(cfg), "error": repr(exc)[:300]}
    res["configs"][name] = r
    att = r.get("kernels_ms", {}).get("decode attention", float("nan"))
    print(f"{name:10s} whole {r.get('graph_ms_whole', float('nan')):.3f} ms ({r.get('graph_ms_whole', float('nan')) / floor:.3f}x)"
          f"  92: {r.get('graph_ms_92', float('nan')):.3f}  attention {att:.3f}  {r.get('error', '')}", flush=True)
(out / "explore_decode.json").write_text(json.dumps(res, indent=2, default=str))
