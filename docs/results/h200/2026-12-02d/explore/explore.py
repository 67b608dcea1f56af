"""Exploration only: the decode graph at 64 x 2048 under grid variants (monkeypatched)."""
import gc, sys, torch
from benchmarks.model_roofline import decode_breakdown, decode_step, time_ms
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.model_runner import ModelRunner
import nexus_tune.engine.kernels  # noqa
da = sys.modules["nexus_tune.engine.kernels.decode_attention"]

whole = SplitTable(0, backend="green-contexts").whole
fn = da.decode_attention
base_defaults = dict(fn.__kwdefaults__)
def run(name, mml, grid_per_sm=64, packed=False, warps=None):
    da.GRID_PER_SM = grid_per_sm
    fn.__kwdefaults__.update(base_defaults)
    kw = {"packed_grid": packed}
    if warps: kw.update(warps)
    fn.__kwdefaults__["config"] = da.DecodeConfig(**kw)
    r = ModelRunner("llama-3.1-8b", num_kv_blocks=8192, max_model_len=mml, max_num_seqs=64)
    r.capture_graphs({}, {"whole": (whole, None)}, 132, decode_buckets=[64])
    step = decode_step(r, 64, 2048)
    ms = time_ms(lambda: r.decode(step, "whole"), iters=20, stream=whole)
    k, _ = decode_breakdown(r, step, whole, key="whole")
    print(f"{name:40s} graph {ms:.3f} ms  attention {k.get('decode attention', 0):.3f} splits_bound {da.num_kv_splits(64, 8, r.max_blocks_per_seq*16, 132)}", flush=True)
    del r; gc.collect(); torch.cuda.empty_cache()

run("2064 default", 2064)
run("4096 default", 4096)
run("4096 GRID_PER_SM=32", 4096, 32)
run("4096 GRID_PER_SM=16", 4096, 16)
run("4096 packed", 4096, packed=True)
run("2064 packed", 2064, packed=True)
run("2064 default again", 2064)
run("8192 default", 8192)
run("8192 packed", 8192, packed=True)
run("2064 block_n 32", 2064, warps={"block_n": 32})
run("2064 stages 2", 2064, warps={"num_stages": 2})
