"""Chunked-prefill attention over the paged KV cache (varlen, packed queries).

Flash-attention style: one program per (query tile, query head, sequence) walks the KV tiles
with an online softmax. The tiles every query of the tile may see are processed without masks;
only the tiles on the causal diagonal pay for one. Query tiles run latest-first, so the heaviest
programs start in the first wave and the cheap ones fill the tail.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.tiles import CAUSAL, FULL, NEG_BIG, attend_tiles, check_attention_inputs, dot_precision


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Tiles for an H100 (sm_90 wgmma, no register spills up to head_dim 128). 64x64 with 4 warps beat
    128x64 and 128x128 with 8 warps by 7-12% at 2048 tokens (docs/performance.md). fp32 inputs, used
    only for exactness checks, go through FMA dots that need far smaller tiles."""
    if dtype == torch.float32:
        return PrefillConfig(32, 32, 4, 2)
    if head_dim > 128:
        return PrefillConfig(64, 32, 4, 2)
    return PrefillConfig(64, 64, 4, 3)


@triton.jit
def _prefill_kernel(q_ptr, k_cache, v_cache, out_ptr, cu_seqlens_q, seq_lens, block_tables, qk_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_tb,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = m_block * BLOCK_M
    if start_m >= q_len:
        return
    prefix = tl.load(seq_lens + b) - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q_pos = prefix + offs_m
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    table_row = block_tables + b * stride_tb
    head_off = (head // GROUP) * stride_kh
    # KV tiles that end at or before the tile's first query position are visible to every row.
    full_hi = (prefix + start_m + 1) // BLOCK_N * BLOCK_N
    hi = prefix + tl.minimum(start_m + BLOCK_M, q_len)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_cache, v_cache, table_row, head_off,
                                 0, full_hi, stride_kb, stride_ks, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, FULL, DOT_PRECISION)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_cache, v_cache, table_row, head_off,
                                 full_hi, hi, stride_kb, stride_ks, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, CAUSAL, DOT_PRECISION)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_q_len: int, *, config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV (prefix + themselves).

    q [T, Hq, D]; cu_seqlens_q [B+1] int32; seq_lens [B] int32 (prefix + new tokens); block_tables
    [B, max_blocks] int32; the new tokens' K/V must already be in the cache. Query i of sequence b
    sits at position seq_lens[b] - q_len_b + i. `max_q_len` (a host int) sizes the grid.
    """
    check_attention_inputs(q, k_cache, v_cache)
    tokens, q_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} / block_tables {tuple(block_tables.shape)} "
                         f"do not match {batch} sequences")
    cfg = config or default_config(head_dim, q.dtype)
    out = torch.empty(tokens, q_heads, head_dim, dtype=q.dtype, device=q.device)
    if tokens == 0 or max_q_len <= 0:
        return out
    grid = (triton.cdiv(max_q_len, cfg.block_m), q_heads, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=q_heads // kv_heads, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
        PAGE=page, DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
