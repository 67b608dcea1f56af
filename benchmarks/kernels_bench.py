"""Time the engine's Triton kernels on the GPU, after checking them against fp32 PyTorch.

  python benchmarks/kernels_bench.py --out "$OUT"     (about a minute on an H100; exit 2 = a check failed)

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token pages):
- decode: 64 x 2048 KV and 8 x 32768 KV; our paged kernel (automatic and swept KV splits, eager
  and CUDA-graph replay) against torch SDPA on the same KV stored contiguously, and against the
  HBM floor (KV bytes / measured device-to-device copy bandwidth);
- prefill: one 2048-token chunk without prefix and over a 6144-token prefix; several tile
  configurations of our kernel against SDPA's flash backend, in TFLOP/s (causal FLOPs only);
- a chunked mixed step's attention: 64 decode rows of 2048 KV tokens plus a 512-token prompt, and
  6 rows of 16384 plus 256, against its HBM floor (bytes moved / copy bandwidth; it is memory-bound):
  the decode rows through the split-KV decode kernel as the engine runs them, and all rows in one
  prefill-kernel launch as before, beside the prompt and the decode rows alone (issue 12);
- rms_norm (+residual), apply_rope and store_kv against their PyTorch equivalents, timed as
  CUDA-graph replays because at decode sizes a launch costs more than the work.
- decode attention 64 x 2048 on the whole GPU and on decode sides of 92 and 68 SMs (green contexts),
  over tile / warp / stage / programs-per-SM configs: a side keeps fewer bytes in flight.
Every kernel is first compared with an fp32 PyTorch reference on the same inputs (relative L2
error). Times are medians of triton.testing.do_bench. Writes kernels_bench.json and .md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.model_roofline import copy_gbps

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM ** -0.5
REL_TOL = 2e-2  # bf16 inputs and outputs against an fp32 reference


def _time(fn, graph: bool = False) -> float:
    """Median milliseconds; `graph` replays fn from a CUDA graph (no launch overhead)."""
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:
        # do_bench_cudagraph runs fn on a stream of its own: the inputs, made on the current stream,
        # must be written first (a block table read while still being written: an illegal address).
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def paged_kv(batch: int, ctx: int, gen: torch.Generator):
    """Caches holding `batch` sequences of `ctx` tokens on shuffled pages, and their block tables."""
    blocks = batch * ctx // PAGE
    k_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    tables = torch.randperm(blocks, device="cuda", generator=gen).view(batch, blocks // batch).to(torch.int32)
    return k_cache, v_cache, tables


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L, D]: the sequences' KV gathered out of the pages."""
    batch, blocks = tables.shape
    return cache[tables.long()].view(batch, blocks * PAGE, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 reference. q [B, Hq, n, D] (the last n positions), k/v [B, Hkv, L, D]; bottom-right causal."""
    n, L = q.shape[2], k.shape[2]
    group = Q_HEADS // KV_HEADS
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * SCALE
    mask = torch.arange(L, device=q.device)[None, :] > torch.arange(L - n, L, device=q.device)[:, None]
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def sdpa_decode(q, k, v):
    """SDPA on contiguous KV: native GQA where this torch has it, else K/V expanded beforehand."""
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), "native GQA"
    except (TypeError, RuntimeError):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return (lambda: F.scaled_dot_product_attention(q, k, v)), "K/V expanded"


def bench_decode(batch: int, ctx: int, bandwidth: float, gen: torch.Generator) -> dict:
    from nexus_tune.engine.kernels import decode_attention, num_kv_splits
    k_cache, v_cache, tables = paged_kv(batch, ctx, gen)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k, v = contiguous_kv(k_cache, tables), contiguous_kv(v_cache, tables)
    ref = ref_attention(q[:, :, None], k, v)[:, :, 0]
    run = lambda splits=None: decode_attention(q, k_cache, v_cache, tables, seq_lens, SCALE, num_splits=splits)
    auto = num_kv_splits(batch, KV_HEADS, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    sweep = {s: _time(lambda s=s: run(s)) for s in sorted({1, 2, 4, 8, 16, 32, auto})}
    best = min(sweep, key=sweep.get)
    sdpa, sdpa_mode = sdpa_decode(q[:, :, None], k, v)
    sdpa_out, ms_sdpa = sdpa(), _time(sdpa)
    kv_bytes = 2 * k.numel() * k.element_size()
    ms = sweep[auto]
    return {
        "case": f"decode {batch} x {ctx}", "rel_err": _rel_err(run(), ref),
        "sdpa_rel_err": _rel_err(sdpa_out[:, :, 0], ref), "sdpa_mode": sdpa_mode,
        "auto_splits": auto, "ms": ms, "ms_graph": _time(run, graph=True), "split_sweep_ms": sweep,
        "best_splits": best, "ms_best": sweep[best], "ms_sdpa": ms_sdpa,
        "ms_hbm_floor": kv_bytes / bandwidth * 1e3, "achieved_tb_s": kv_bytes / (ms * 1e-3) / 1e12,
    }


DECODE_SIDES = (None, 92, 68)  # the whole GPU, and decode sides of splits: fewer SMs to keep HBM busy


def bench_decode_sides(batch: int, ctx: int, bandwidth: float, gen: torch.Generator) -> list[dict]:
    """Decode attention configs (tile, warps, stages, programs per SM) on the whole GPU and on decode
    sides: a side has fewer SMs to keep the same bytes in flight (on the H200's 92-SM side the default
    ran 1.41x its whole-GPU time while an elementwise kernel there reached 95% of the bandwidth)."""
    from nexus_tune.engine.kernels import DecodeConfig, decode_attention
    from nexus_tune.core.partition import SplitTable

    k_cache, v_cache, tables = paged_kv(batch, ctx, gen)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    ref = ref_attention(q[:, :, None], contiguous_kv(k_cache, tables), contiguous_kv(v_cache, tables))[:, :, 0]
    configs = [DecodeConfig()] + [
        DecodeConfig(n, w, st, p) for n, w, st, p in
        ((64, 4, 3, 4), (64, 4, 2, 8), (64, 4, 3, 8), (32, 4, 3, 8), (128, 8, 2, 4), (64, 8, 3, 6))]
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2
    rows = []
    with SplitTable(0, backend="green-contexts") as table:
        for side in DECODE_SIDES:
            stream = table.whole if side is None else table[table.total_sms - side].decode_stream
            sms = side or table.total_sms
            for cfg in configs:
                run = lambda cfg=cfg: decode_attention(q, k_cache, v_cache, tables, seq_lens, SCALE, num_sms=sms,
                                                       config=cfg)
                with torch.cuda.stream(stream):
                    err, ms = _rel_err(run(), ref), _time(run)
                rows.append({"sms": sms, "config": asdict(cfg), "rel_err": err, "ms": ms,
                             "achieved_tb_s": kv_bytes / (ms * 1e-3) / 1e12,
                             "ms_hbm_floor": kv_bytes / bandwidth * 1e3})
    return rows


def causal_flops(q_len: int, prefix: int) -> float:
    """QK^T and PV over the visible (query, key) pairs: 4 * D FLOPs per pair per head."""
    pairs = q_len * prefix + q_len * (q_len + 1) / 2
    return 4.0 * HEAD_DIM * Q_HEADS * pairs


def sdpa_flash_prefill(q, k, v, prefix: int):
    """SDPA's flash backend on [1, H, L, D] tensors (K/V expanded to the query heads beforehand),
    bottom-right causal when there is a prefix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    group = Q_HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask_kw = {"is_causal": True} if prefix == 0 else {"attn_mask": causal_lower_right(q.shape[2], k.shape[2])}

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **mask_kw)
    return run


def packed_tiles(q_lens: list[int], prefixes: list[int], cfg) -> torch.Tensor:
    """The tile map of a step, sized as the engine sizes it."""
    from nexus_tune.engine.kernels import max_tiles, tile_map
    tokens = cfg.tile_tokens(Q_HEADS // KV_HEADS)
    return torch.from_numpy(tile_map(q_lens, prefixes, tokens, max_tiles(sum(q_lens), len(q_lens), tokens))).cuda()


def bench_prefill(q_len: int, prefix: int, configs, gen: torch.Generator) -> dict:
    from nexus_tune.engine.kernels import prefill_attention
    ctx = prefix + q_len
    k_cache, v_cache, tables = paged_kv(1, ctx, gen)
    q = torch.randn(q_len, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    cu = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    k, v = contiguous_kv(k_cache, tables), contiguous_kv(v_cache, tables)
    k_new, v_new = k[0, :, prefix:].transpose(0, 1), v[0, :, prefix:].transpose(0, 1)  # the chunk's own K/V
    q4 = q.transpose(0, 1)[None].contiguous()
    ref = ref_attention(q4, k, v)[0].transpose(0, 1)
    flops = causal_flops(q_len, prefix)
    result = {"case": f"prefill {q_len} over {prefix}", "configs": []}
    for cfg in configs:
        tiles = packed_tiles([q_len], [prefix], cfg)
        run = lambda cfg=cfg, tiles=tiles: prefill_attention(q, k_new, v_new, k_cache, v_cache, cu, seq_lens, tables,
                                                             tiles, SCALE, config=cfg)
        try:
            err = _rel_err(run(), ref)
            ms = _time(run)
        except Exception as exc:  # a tile shape this GPU/triton cannot fit is a result, not a crash
            result["configs"].append({"config": asdict(cfg), "error": repr(exc)[:200]})
            continue
        result["configs"].append({"config": asdict(cfg), "rel_err": err, "ms": ms, "tflops": flops / ms / 1e9})
    ok = [c for c in result["configs"] if "ms" in c]
    result["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
    try:
        sdpa = sdpa_flash_prefill(q4, k, v, prefix)
        sdpa_out = sdpa()
        ms_sdpa = _time(sdpa)
        result.update(sdpa_rel_err=_rel_err(sdpa_out[0].transpose(0, 1), ref), ms_sdpa=ms_sdpa,
                      sdpa_tflops=flops / ms_sdpa / 1e9)
    except RuntimeError as exc:
        result["sdpa_error"] = repr(exc)[:200]
    return result


def bench_mixed(prompt: int, decode_rows: int, ctx: int, bandwidth: float, gen: torch.Generator) -> dict:
    """A chunked mixed step's attention as the engine packs it: `decode_rows` 1-token rows over `ctx` KV
    tokens each, then one `prompt`-token chunk (no prefix), CUDA-graph replays, against the bytes it
    must move (every KV token once per KV head, q read, output written). Two ways: every row in one
    prefill-kernel launch (`ms_one_kernel`, before), and the engine's way now (`ms`): the decode rows
    through the split-KV decode kernel, the prompt through the tile map (AttentionMetadata.decode_rows)."""
    from nexus_tune.engine.attention import AttentionMetadata, prefill_attention as attend_prefill
    from nexus_tune.engine.kernels import decode_attention, default_config, prefill_attention
    k_cache, v_cache, tables = paged_kv(decode_rows + 1, ctx, gen)  # the last sequence holds the prompt
    k, v = contiguous_kv(k_cache, tables), contiguous_kv(v_cache, tables)
    q = torch.randn(decode_rows + prompt, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    q_dec, q_prompt = q[:decode_rows], q[decode_rows:].transpose(0, 1)[None]
    # The step's own K/V as the projection makes them: each decode row's last token, then the prompt's.
    k_new = torch.cat([k[:decode_rows, :, ctx - 1], k[decode_rows, :, :prompt].transpose(0, 1)])
    v_new = torch.cat([v[:decode_rows, :, ctx - 1], v[decode_rows, :, :prompt].transpose(0, 1)])
    q_lens, prefixes = [1] * decode_rows + [prompt], [ctx - 1] * decode_rows + [0]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([ctx] * decode_rows + [prompt], dtype=torch.int32, device="cuda")
    cfg = default_config(HEAD_DIM, DTYPE)
    tiles = packed_tiles(q_lens, prefixes, cfg)
    one_kernel = lambda: prefill_attention(q, k_new, v_new, k_cache, v_cache, cu, seq_lens, tables, tiles, SCALE)
    meta = AttentionMetadata(is_prefill=True, slot_mapping=seq_lens, block_tables=tables, seq_lens=seq_lens,
                             cu_seqlens_q=cu, max_seq_len=ctx, tiles=packed_tiles([0] * decode_rows + [prompt], prefixes, cfg),
                             decode_rows=torch.tensor([decode_rows], dtype=torch.int32, device="cuda"))
    split = lambda: attend_prefill(q, k_new, v_new, k_cache, v_cache, meta, SCALE, "triton")
    ref = torch.cat([ref_attention(q_dec[:, :, None], k[:decode_rows], v[:decode_rows])[:, :, 0],
                     ref_attention(q_prompt, k[decode_rows:, :, :prompt], v[decode_rows:, :, :prompt])[0].transpose(0, 1)])
    # Alone, for scale: the prompt through the prefill kernel; the decode rows through the decode kernel.
    prompt_tiles, prompt_cu = packed_tiles([prompt], [0], cfg), cu[decode_rows:] - decode_rows
    prompt_only = lambda: prefill_attention(q[decode_rows:], k_new[decode_rows:], v_new[decode_rows:], k_cache, v_cache,
                                            prompt_cu, seq_lens[decode_rows:], tables[decode_rows:], prompt_tiles, SCALE)
    dec_only = lambda: decode_attention(q_dec, k_cache, v_cache, tables[:decode_rows], seq_lens[:decode_rows], SCALE)
    elem = q.element_size()
    kv_bytes = 2 * KV_HEADS * HEAD_DIM * elem * (decode_rows * ctx + prompt)
    nbytes = kv_bytes + 2 * q.numel() * elem
    err_one, err = _rel_err(one_kernel(), ref), _rel_err(split(), ref)  # also compiles before the captures
    ms, ms_one, floor = _time(split, graph=True), _time(one_kernel, graph=True), nbytes / bandwidth * 1e3
    return {"case": f"mixed {decode_rows} x {ctx} decode + {prompt} prompt", "rel_err": max(err, err_one),
            "ms": ms, "ms_one_kernel": ms_one, "ms_hbm_floor": floor, "ratio": ms / floor, "ratio_one_kernel": ms_one / floor,
            "ms_prompt_only": _time(prompt_only, graph=True), "ms_decode_kernel": _time(dec_only, graph=True),
            "tile_tokens": cfg.tile_tokens(Q_HEADS // KV_HEADS)}


def torch_rms_norm(x, weight, eps, residual):
    """HF LlamaRMSNorm after the residual add, eager."""
    h = x + residual
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), h


def bench_rms_norm(rows: int, hidden: int, gen: torch.Generator) -> dict:
    from nexus_tune.engine.kernels import rms_norm
    x, res = (torch.randn(rows, hidden, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))
    w = torch.randn(hidden, device="cuda", dtype=DTYPE, generator=gen)
    hf = (x.float() + res.float())
    ref = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    ms = _time(lambda: rms_norm(x, w, 1e-5, res), graph=True)
    return {"case": f"rms_norm+residual {rows} x {hidden}", "rel_err": _rel_err(rms_norm(x, w, 1e-5, res)[0], ref),
            "ms": ms, "ms_torch": _time(lambda: torch_rms_norm(x, w, 1e-5, res), graph=True),
            "gb_s": 4 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9}


def torch_rope(q, k, positions, cos_sin):
    """HF rotate-half RoPE, eager, out of place."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[:, None].to(q.dtype), torch.cat([sin, sin], -1)[:, None].to(q.dtype)

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    return rot(q), rot(k)


def bench_rope(tokens: int, gen: torch.Generator) -> dict:
    from nexus_tune.engine.kernels import apply_rope
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    freqs = torch.arange(8192, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    positions = torch.randint(0, 8192, (tokens,), device="cuda", generator=gen)
    q = torch.randn(tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    ref_q, _ = torch_rope(q.float(), k.float(), positions, cos_sin)
    out_q, _ = apply_rope(q.clone(), k.clone(), positions, cos_sin)
    return {"case": f"apply_rope {tokens} tokens", "rel_err": _rel_err(out_q, ref_q),
            "ms": _time(lambda: apply_rope(q, k, positions, cos_sin), graph=True),
            "ms_torch": _time(lambda: torch_rope(q, k, positions, cos_sin), graph=True)}


def bench_store_kv(tokens: int, gen: torch.Generator) -> dict:
    from nexus_tune.engine.kernels import store_kv
    k_cache = torch.zeros(4096, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))
    slots = torch.randperm(k_cache.shape[0] * PAGE, device="cuda", generator=gen)[:tokens]
    store_kv(k, v, k_cache, v_cache, slots)
    err = _rel_err(k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], k)

    def torch_store():  # what nexus_tune/engine/attention.py's reference path does
        k_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, k)
        v_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v)
    return {"case": f"store_kv {tokens} tokens", "rel_err": err,
            "ms": _time(lambda: store_kv(k, v, k_cache, v_cache, slots), graph=True),
            "ms_torch": _time(torch_store, graph=True)}


def to_markdown(res: dict) -> str:
    lines = [f"# Kernel benchmark on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}; copy bandwidth {res['copy_tb_s']:.2f} TB/s; "
             f"times are medians in ms; rel_err = L2 error against fp32 PyTorch.", "",
             "## Decode attention (Llama-3.1-8B heads, bf16, 16-token pages)", "",
             "| case | rel_err | splits (auto/best) | ms | ms graph | ms best split | SDPA ms | HBM floor ms | TB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in res["decode"]:
        lines.append(f"| {d['case']} | {d['rel_err']:.1e} | {d['auto_splits']}/{d['best_splits']} | {d['ms']:.3f} | "
                     f"{d['ms_graph']:.3f} | {d['ms_best']:.3f} | {d['ms_sdpa']:.3f} ({d['sdpa_mode']}) | "
                     f"{d['ms_hbm_floor']:.3f} | {d['achieved_tb_s']:.2f} |")
    lines += ["", "Split sweep (ms): " + "; ".join(
        f"{d['case']}: " + ", ".join(f"{s}={ms:.3f}" for s, ms in d["split_sweep_ms"].items()) for d in res["decode"]),
        "", "## Prefill attention (one sequence, causal)", "",
        "| case | config (BM, BN, warps, stages) | rel_err | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for p in res["prefill"]:
        for c in p["configs"]:
            cfg = tuple(c["config"].values())
            if "error" in c:
                lines.append(f"| {p['case']} | {cfg} | failed: {c['error']} | | |")
            else:
                lines.append(f"| {p['case']} | {cfg} | {c['rel_err']:.1e} | {c['ms']:.3f} | {c['tflops']:.0f} |")
        if "ms_sdpa" in p:
            lines.append(f"| {p['case']} | SDPA flash | {p['sdpa_rel_err']:.1e} | {p['ms_sdpa']:.3f} | {p['sdpa_tflops']:.0f} |")
        else:
            lines.append(f"| {p['case']} | SDPA flash | failed: {p.get('sdpa_error')} | | |")
    lines += ["", "## A chunked mixed step's attention (CUDA-graph replay)", "",
              "| case | rel_err | ms (decode rows split) | one prefill kernel ms | HBM floor ms | ratio (before) | "
              "prompt alone ms | decode kernel ms |", "|---|---|---|---|---|---|---|---|"]
    for m in res["mixed"]:
        lines.append(f"| {m['case']} | {m['rel_err']:.1e} | {m['ms']:.3f} | {m['ms_one_kernel']:.3f} | "
                     f"{m['ms_hbm_floor']:.3f} | {m['ratio']:.2f}x ({m['ratio_one_kernel']:.2f}x) | "
                     f"{m['ms_prompt_only']:.3f} | {m['ms_decode_kernel']:.3f} |")
    lines += ["", "## Decode attention 64 x 2048 on split sides", "",
              "| SMs | config (block_n, warps, stages, programs/SM) | rel_err | ms | TB/s |", "|---|---|---|---|---|"]
    for d in res["decode_sides"]:
        lines.append(f"| {d['sms']} | {tuple(d['config'].values())} | {d['rel_err']:.1e} | {d['ms']:.3f} | "
                     f"{d['achieved_tb_s']:.2f} |")
    lines += ["", "## Small kernels (CUDA-graph replay)", "", "| case | rel_err | ms | torch ms |", "|---|---|---|---|"]
    for s in res["small"]:
        lines.append(f"| {s['case']} | {s['rel_err']:.1e} | {s['ms']:.4f} | {s['ms_torch']:.4f} |")
    lines += ["", f"All rel_err below {REL_TOL}: {res['all_correct']}"]
    return "\n".join(lines) + "\n"


def print_summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Triton kernels on {res['device']}")
    for col in ("case", "rel_err", "ours ms", "baseline ms", "note"):
        table.add_column(col)
    for d in res["decode"]:
        table.add_row(d["case"], f"{d['rel_err']:.1e}", f"{d['ms']:.3f}", f"{d['ms_sdpa']:.3f} SDPA",
                      f"floor {d['ms_hbm_floor']:.3f}, {d['achieved_tb_s']:.2f} TB/s, best splits {d['best_splits']}")
    for p in res["prefill"]:
        b = p["best"]
        if b is None:
            table.add_row(p["case"], "-", "-", "-", "every config failed")
            continue
        table.add_row(p["case"], f"{b['rel_err']:.1e}", f"{b['ms']:.3f}", f"{p.get('ms_sdpa', float('nan')):.3f} SDPA",
                      f"{b['tflops']:.0f} vs {p.get('sdpa_tflops', float('nan')):.0f} TFLOP/s, best {tuple(b['config'].values())}")
    for m in res["mixed"]:
        table.add_row(m["case"], f"{m['rel_err']:.1e}", f"{m['ms']:.3f}", f"{m['ms_hbm_floor']:.3f} HBM floor",
                      f"{m['ratio']:.2f}x floor (one kernel {m['ratio_one_kernel']:.2f}x); prompt alone "
                      f"{m['ms_prompt_only']:.3f}, decode kernel {m['ms_decode_kernel']:.3f}")
    for s in res["small"]:
        table.add_row(s["case"], f"{s['rel_err']:.1e}", f"{s['ms']:.4f}", f"{s['ms_torch']:.4f} torch", "graph replay")
    for sms in sorted({d["sms"] for d in res["decode_sides"]}, reverse=True):
        rows = [d for d in res["decode_sides"] if d["sms"] == sms]
        best = min(rows, key=lambda d: d["ms"])
        table.add_row(f"decode 64 x 2048 on {sms} SMs", f"{best['rel_err']:.1e}", f"{best['ms']:.3f}",
                      f"{rows[0]['ms']:.3f} default", f"best {tuple(best['config'].values())}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench needs a CUDA GPU; the kernels' CPU checks are in tests/test_kernels.py")
        return 1
    import triton
    from nexus_tune.engine.kernels import PrefillConfig
    from nexus_tune.engine.kernels.prefill_attention import default_config

    gen = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = copy_gbps() * 1e9  # bytes/s
    configs = [default_config(HEAD_DIM, DTYPE), PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 3),
               PrefillConfig(128, 128, 8, 2), PrefillConfig(128, 64, 4, 3), PrefillConfig(64, 128, 4, 3),
               PrefillConfig(128, 32, 8, 3)]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_tb_s": bandwidth / 1e12,
           "decode": [bench_decode(64, 2048, bandwidth, gen), bench_decode(8, 32768, bandwidth, gen)],
           "prefill": [bench_prefill(2048, 0, configs, gen), bench_prefill(2048, 6144, configs, gen)],
           "mixed": [bench_mixed(512, 64, 2048, bandwidth, gen), bench_mixed(256, 6, 16384, bandwidth, gen)],
           "decode_sides": bench_decode_sides(64, 2048, bandwidth, gen),
           "small": [bench_rms_norm(2048, 4096, gen), bench_rms_norm(64, 4096, gen), bench_rope(2048, gen),
                     bench_rope(64, gen), bench_store_kv(2048, gen), bench_store_kv(64, gen)]}
    errors = [d["rel_err"] for d in res["decode"] + res["small"] + res["decode_sides"] + res["mixed"]]
    errors += [c["rel_err"] for p in res["prefill"] for c in p["configs"] if "rel_err" in c]
    default_ran = all("rel_err" in p["configs"][0] for p in res["prefill"])  # configs[0] is the default
    res["all_correct"] = default_ran and max(errors) < REL_TOL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "kernels_bench.md").write_text(to_markdown(res))
    print_summary(res)
    print(f"wrote {out / 'kernels_bench.json'} and {out / 'kernels_bench.md'}")
    return 0 if res["all_correct"] else 2


if __name__ == "__main__":
    sys.exit(main())
