"""Exploration only: decode graph 64 x 2048 by split bound and partials layout (monkeypatched)."""
import gc, sys, torch
from benchmarks.model_roofline import decode_breakdown, decode_step, time_ms
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.model_runner import ModelRunner
import nexus_tune.engine.kernels  # noqa
da = sys.modules["nexus_tune.engine.kernels.decode_attention"]
whole = SplitTable(0, backend="green-contexts").whole

def run(layout, mml, grid_per_sm):
    da.GRID_PER_SM, da.PARTIALS_LAYOUT = grid_per_sm, layout
    r = ModelRunner("llama-3.1-8b", num_kv_blocks=8192, max_model_len=mml, max_num_seqs=64)
    r.capture_graphs({}, {"whole": (whole, None)}, 132, decode_buckets=[64])
    step = decode_step(r, 64, 2048)
    ms = time_ms(lambda: r.decode(step, "whole"), iters=20, stream=whole)
    k, _ = decode_breakdown(r, step, whole, key="whole")
    print(f"{layout} mml {mml} bound {da.num_kv_splits(64, 8, r.max_blocks_per_seq*16, 132):2d}: graph {ms:.3f} ms  attention {k.get('decode attention', 0):.3f}", flush=True)
    del r; gc.collect(); torch.cuda.empty_cache()

for layout in ("bhsd", "bshd", "sbhd"):
    for mml, g in ((2064, 64), (4096, 64), (4096, 16), (8192, 64), (32768, 128)):
        run(layout, mml, g)
