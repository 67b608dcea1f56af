"""Exploration only: compiled variants of the decode kernel by split bound; times under a tree given by sys.path."""
import gc, sys, torch
from benchmarks.model_roofline import decode_breakdown, decode_step, time_ms
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.model_runner import ModelRunner
import nexus_tune.engine.kernels  # noqa
da = sys.modules["nexus_tune.engine.kernels.decode_attention"]
print("module", da.__file__)
whole = SplitTable(0, backend="green-contexts").whole
def meta():
    try:
        for dev, caches in da._split_kernel.device_caches.items():
            for key, ck in caches[0].items():
                print("   compiled: regs", ck.n_regs, "spills", ck.n_spills, "shared", ck.metadata.shared, "key", str(key)[-160:])
    except Exception as e:
        print("   meta error", repr(e))
def run(mml, g):
    da.GRID_PER_SM = g
    r = ModelRunner("llama-3.1-8b", num_kv_blocks=8192, max_model_len=mml, max_num_seqs=64)
    r.capture_graphs({}, {"whole": (whole, None)}, 132, decode_buckets=[64])
    step = decode_step(r, 64, 2048)
    ms = time_ms(lambda: r.decode(step, "whole"), iters=20, stream=whole)
    k, _ = decode_breakdown(r, step, whole, key="whole")
    print(f"bound {da.num_kv_splits(64, 8, r.max_blocks_per_seq*16, 132):2d}: graph {ms:.3f} ms  attention {k.get('decode attention', 0):.3f}", flush=True)
    del r; gc.collect(); torch.cuda.empty_cache()
for mml, g in ((2064, 64), (4096, 64), (4096, 16), (8192, 64)):
    run(mml, g)
meta()
