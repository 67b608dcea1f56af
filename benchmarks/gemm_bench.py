"""Decode GEMMs (a few rows, bound by the weight's bytes): cuBLAS and cuBLASLt against the skinny Triton kernel.

    PYTHONPATH=. python benchmarks/gemm_bench.py --out $OUT     (about a minute on an H200)

For llama-3.1-8b and qwen2.5-3b (random bf16 weights): the layer's qkv, o_proj, gate_up and down and
the LM head, at M rows, on the whole GPU and on the decode side of the split that gives decode 92
SMs (a green context). The engine uses the skinny kernel for the LM head only; the layer's GEMMs
are here to show why. Each candidate config of nexus_tune/engine/kernels/skinny_gemm.py is checked
against an fp32 product first, then timed as a CUDA graph of calls that cycle through copies of W
totalling over 4x the L2 (so every call reads W from HBM, as a decode step does). GB/s counts W and
x read and y written; the copy rate measured in the same run is the ceiling. Writes gemm_bench.json
and .md to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.model_roofline import copy_gbps
from nexus_tune.core.device import software_versions
from nexus_tune.core.partition import SplitTable
from nexus_tune.engine.config import ModelConfig, get_preset
from nexus_tune.engine.cuda_graphs import blas_library
from nexus_tune.engine.kernels.skinny_gemm import SkinnyConfig, skinny_linear

MODELS = ("llama-3.1-8b", "qwen2.5-3b")
ROWS = (16, 64)
DECODE_SIDE = 92
L2_SPAN = 256 << 20  # bytes of W copies cycled through: over 4x the H200's L2
REL_TOL = 2e-2
CANDIDATES = [
    SkinnyConfig(), SkinnyConfig(block_n=64, block_k=128), SkinnyConfig(block_n=128, block_k=128, num_stages=3, num_warps=8),
    SkinnyConfig(block_n=128, block_k=64, num_stages=6), SkinnyConfig(block_n=256, block_k=64, num_stages=3, num_warps=8),
]


def shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (K, N)."""
    h, i = c.hidden_size, c.intermediate_size
    return {"qkv": (h, c.q_size + 2 * c.kv_size), "o_proj": (c.q_size, h), "gate_up": (h, 2 * i), "down": (i, h),
            "lm_head": (h, c.vocab_size)}


def graph_ms(calls: list[Callable[[], object]], stream: torch.cuda.Stream, loops: int = 5) -> float:
    """Median over `loops` replays of a graph running every call once, per call."""
    with torch.cuda.stream(stream):
        for call in calls:  # compile, autotune and allocate outside capture
            call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
        graph.replay()
        times = []
        for _ in range(loops):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(k: int, n: int, rows: int, sides: dict[str, tuple[Any, int]], gen: torch.Generator
                ) -> list[dict[str, Any]]:
    w_bytes = n * k * 2
    copies = max(2, -(-L2_SPAN // w_bytes))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k ** -0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = F.linear(x.float(), ws[0].float())
    moved = w_bytes + x.numel() * 2 + rows * n * 2
    out = []
    for side, (stream, sms) in sides.items():
        row: dict[str, Any] = {"k": k, "n": n, "rows": rows, "side": side, "sms": sms, "bytes": moved}
        row["cublas_ms"] = graph_ms([lambda w=w: F.linear(x, w) for w in ws], stream)
        with blas_library("cublaslt"):  # captured under the setting: the graph keeps cuBLASLt's kernels
            row["cublaslt_ms"] = graph_ms([lambda w=w: F.linear(x, w) for w in ws], stream)
        tried = []
        for cfg in CANDIDATES:
            err = rel_err(skinny_linear(x, ws[0], cfg=cfg), ref)
            if err > REL_TOL:
                raise AssertionError(f"skinny {cfg} on {rows}x{k}x{n}: relative error {err:.3g}")
            ms = graph_ms([lambda w=w, cfg=cfg: skinny_linear(x, w, cfg=cfg) for w in ws], stream)
            tried.append({"config": asdict(cfg), "ms": ms})
        best = min(tried, key=lambda t: t["ms"])
        row.update(default_ms=tried[0]["ms"], best_ms=best["ms"], best_config=best["config"], tried=tried)
        out.append(row)
    return out


def to_markdown(res: dict[str, Any]) -> str:
    bw = res["copy_gbps"]
    lines = [f"# Decode GEMMs: cuBLAS vs skinny Triton ({res['device']}, {res['date']})", "",
             f"Copy bandwidth {bw:.0f} GB/s. GB/s = (W + x + y bytes) / time; % of the copy rate in brackets.", "",
             "| model | GEMM | rows | side | cuBLAS ms (GB/s) | cuBLASLt ms (GB/s) | skinny (engine's config) ms (GB/s) "
             "| best ms | best config |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        def rate(ms):
            g = r["bytes"] / ms / 1e6
            return f"{ms:.4f} ({g:.0f}, {100 * g / bw:.0f}%)"
        cfg = r["best_config"]
        lines.append(f"| {r['model']} | {r['gemm']} {r['k']}x{r['n']} | {r['rows']} | {r['side']} | "
                     f"{rate(r['cublas_ms'])} | {rate(r['cublaslt_ms'])} | {rate(r['default_ms'])} | {r['best_ms']:.4f} | "
                     f"n{cfg['block_n']} k{cfg['block_k']} s{cfg['num_stages']} w{cfg['num_warps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import datetime
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = SplitTable(warn=False)
    total = table.total_sms
    sides = {"whole": (table.whole, total), f"decode {DECODE_SIDE}": (table[total - DECODE_SIDE].decode_stream,
                                                                        DECODE_SIDE)}
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                           "software": software_versions(), "copy_gbps": copy_gbps(), "rows": []}
    with torch.inference_mode():
        for model in args.models.split(","):
            for name, (k, n) in shapes(get_preset(model)).items():
                for rows in map(int, args.rows.split(",")):
                    for r in bench_shape(k, n, rows, sides, gen):
                        r.update(model=model, gemm=name)
                        res["rows"].append(r)
                        bw = r["bytes"] / 1e6
                        print(f"{model:13s} {name:8s} M={rows:3d} {r['side']:10s} cublas {r['cublas_ms']:.4f} "
                              f"({bw / r['cublas_ms']:.0f} GB/s) lt {r['cublaslt_ms']:.4f} skinny {r['default_ms']:.4f} best {r['best_ms']:.4f} "
                              f"({bw / r['best_ms']:.0f} GB/s) {r['best_config']}", flush=True)
                    torch.cuda.empty_cache()
    table.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_bench.json").write_text(json.dumps(res, indent=1))
    (args.out / "gemm_bench.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
