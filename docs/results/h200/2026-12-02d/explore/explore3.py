"""Exploration only: does the decode graph's speed follow the partials' address? (o_part offset)"""
import gc, math, sys, torch
from benchmarks.model_roofline import decode_breakdown, decode_step, time_ms
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.model_runner import ModelRunner
import nexus_tune.engine.kernels  # noqa
da = sys.modules["nexus_tune.engine.kernels.decode_attention"]
whole = SplitTable(0, backend="green-contexts").whole
OFF = [0]
class T:
    def __getattr__(self, n): return getattr(torch, n)
    def empty(self, *shape, **kw):
        if kw.get("dtype") is torch.float32 and len(shape) == 4 and OFF[0]:
            buf = torch.empty(math.prod(shape) + OFF[0] // 4, **kw)
            return buf[OFF[0] // 4:].view(*shape)
        return torch.empty(*shape, **kw)
da.torch = T()
def run(mml, off):
    OFF[0] = off
    r = ModelRunner("llama-3.1-8b", num_kv_blocks=8192, max_model_len=mml, max_num_seqs=64)
    r.capture_graphs({}, {"whole": (whole, None)}, 132, decode_buckets=[64])
    step = decode_step(r, 64, 2048)
    ms = time_ms(lambda: r.decode(step, "whole"), iters=20, stream=whole)
    k, _ = decode_breakdown(r, step, whole, key="whole")
    print(f"mml {mml} o_part offset {off:8d} B: graph {ms:.3f} ms  attention {k.get('decode attention', 0):.3f}", flush=True)
    del r; gc.collect(); torch.cuda.empty_cache()
for mml in (4096, 2064):
    for off in (0, 512, 4096, 65536, 1 << 20, 3 << 20):
        run(mml, off)
