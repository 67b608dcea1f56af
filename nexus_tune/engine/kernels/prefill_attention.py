"""Chunked-prefill attention over a cached prefix and the chunk itself (varlen, packed queries).

Flash-attention style with packed GQA: one program per (query tile, KV head) walks the KV tiles with
an online softmax. A tile's BLOCK_M rows are (token, query head) pairs of one KV head, row r being
token t0 + r // G and query head kv_head * G + r % G (G query heads per KV head), so a tile covers
BLOCK_M // G tokens (`PrefillConfig.tile_tokens`) and K/V are read once for all G heads, not once
per query head: a decode row (one token over a long prefix, in chunked mixed steps) read its KV G
times before (H200, llama-3.1-8b, 512 prompt tokens + 64 rows of 2048 KV: 0.47 -> 0.16 ms, 1.3x
the HBM floor; pure prefill within 2% or faster). A decode row's tile holds only G useful rows, but
those tiles are bound by their KV reads: a 16-row variant for them measured no faster.

A sequence's KV has two sources: its cached prefix, read from the paged cache through its block
table, and the chunk's own tokens, read straight from the K/V the projection just made (contiguous
rows: no page gathers, where the causal diagonal and most of a fresh prompt's work is). Only the
tiles on the causal diagonal and the prefix's last partial tile pay for a mask; each row's causal
bound is its own token's position.

The grid comes from shapes only, so the launch can be captured in a CUDA graph: a tile map
(`tile_map`, built on the host with the batch in units of `tile_tokens` query tokens) lists each
program's (sequence, query tile), heaviest first so the costly programs start in the first wave;
rows past the batch's tiles hold -1 and their programs return at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from nexus_tune.engine.kernels.tiles import BOUNDED, CAUSAL, FULL, NEG_BIG, attend_tiles, check_attention_inputs, dot_precision


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # rows per tile: (token, query head) pairs
    block_n: int
    num_warps: int
    num_stages: int

    def tile_tokens(self, group: int) -> int:
        """Query tokens per tile for `group` query heads per KV head: the unit of `tile_map`."""
        if not 1 <= group <= self.block_m:
            raise ValueError(f"a tile of {self.block_m} rows cannot hold the {group} query heads of a KV head")
        return self.block_m // group


def default_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Tiles for Hopper (sm_90 wgmma, no register spills up to head_dim 128); benchmarks/kernels_bench.py
    sweeps the alternatives (docs/performance.md). fp32 inputs, used only for exactness checks, go
    through FMA dots that need far smaller tiles."""
    if dtype == torch.float32:
        return PrefillConfig(32, 32, 4, 2)
    if head_dim > 128:
        return PrefillConfig(64, 32, 4, 2)
    return PrefillConfig(64, 64, 4, 3)


def tile_map(q_lens: np.ndarray, prefix_lens: np.ndarray, tile_tokens: int, capacity: int | None = None
             ) -> np.ndarray:
    """[capacity, 2] int32 rows (sequence, query tile of `tile_tokens` tokens) covering every sequence's
    queries, the tiles that read the most KV first; rows past the tiles are -1. `capacity` defaults
    to the tile count."""
    q_lens, prefix_lens = np.asarray(q_lens, np.int64), np.asarray(prefix_lens, np.int64)
    per_seq = -(-q_lens // tile_tokens)
    seq = np.repeat(np.arange(len(q_lens)), per_seq)
    tile = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    capacity = len(seq) if capacity is None else capacity
    if len(seq) > capacity:
        raise ValueError(f"{len(seq)} query tiles do not fit a tile map of {capacity}")
    order = np.argsort(-(prefix_lens[seq] + tile * tile_tokens), kind="stable")  # KV each tile reads
    out = np.full((capacity, 2), -1, dtype=np.int32)
    out[: len(seq), 0], out[: len(seq), 1] = seq[order], tile[order]
    return out


def max_tiles(tokens: int, seqs: int, tile_tokens: int) -> int:
    """Tiles a batch of at most `tokens` query tokens over at most `seqs` sequences can need."""
    return triton.cdiv(tokens, tile_tokens) + seqs


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, k_cache, v_cache, out_ptr, cu_seqlens_q, seq_lens, block_tables, tiles,
                    qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                    stride_cb, stride_cs, stride_ch, stride_tb,
                    GROUP: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.load(tiles + 2 * tl.program_id(0))
    if b < 0:
        return
    start_m = tl.load(tiles + 2 * tl.program_id(0) + 1) * TILE_TOKENS
    kv_head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    prefix = tl.load(seq_lens + b) - q_len

    # Row r: token start_m + r // GROUP, query head kv_head * GROUP + r % GROUP (rows past
    # TILE_TOKENS * GROUP, when GROUP does not divide BLOCK_M, are masked).
    r = tl.arange(0, BLOCK_M)
    offs_m = start_m + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (r < TILE_TOKENS * GROUP) & (offs_m < q_len)
    q_pos = prefix + offs_m
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    # The cached prefix [0, prefix): every query sees all of it; only its last tile may be partial.
    table_row = block_tables + b * stride_tb
    cache_full = prefix // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_cache, v_cache, table_row, 0, kv_head * stride_ch,
                                 0, cache_full, stride_cb, stride_cs, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, FULL, DOT_PRECISION, True)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_cache, v_cache, table_row, 0, kv_head * stride_ch,
                                 cache_full, prefix, stride_cb, stride_cs, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, BOUNDED, DOT_PRECISION, True)
    # The chunk [prefix, hi), rows q_start.. of k/v: tiles ending at or before the tile's first query
    # position are seen whole by every row; the rest sit on the causal diagonal.
    new_full = prefix + (start_m + 1) // BLOCK_N * BLOCK_N
    hi = prefix + tl.minimum(start_m + TILE_TOKENS, q_len)
    row_base = q_start - prefix
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_row, row_base, kv_head * stride_kh,
                                 prefix, new_full, 0, stride_kt, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, FULL, DOT_PRECISION, False)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_row, row_base, kv_head * stride_kh,
                                 new_full, hi, 0, stride_kt, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, CAUSAL, DOT_PRECISION, False)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, tiles: torch.Tensor, scale: float,
                      *, config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' cached prefix and themselves.

    q [T, Hq, D]; k, v [T, Hkv, D] the new tokens' keys and values (views of a fused projection are
    fine; equal strides); caches [num_blocks, block_size, Hkv, D] holding each prefix; cu_seqlens_q
    [B+1] int32; seq_lens [B] int32 (prefix + new tokens); block_tables [B, max_blocks] int32; tiles
    [N, 2] int32 from `tile_map` in units of the config's `tile_tokens(Hq // Hkv)`; the grid is
    (N, Hkv). Query i of sequence b sits at position seq_lens[b] - q_len_b + i. Rows of q outside
    every sequence are left unwritten.
    """
    check_attention_inputs(q, k_cache, v_cache)
    tokens, q_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} / block_tables {tuple(block_tables.shape)} "
                         f"do not match {batch} sequences")
    if k.shape != (tokens, kv_heads, head_dim) or v.shape != k.shape or k.stride() != v.stride() or k.stride(2) != 1:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must both be [{tokens}, {kv_heads}, {head_dim}] "
                         "with equal strides and a contiguous head dimension")
    if tiles.dim() != 2 or tiles.shape[1] != 2 or tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be [N, 2] int32 (engine.kernels.tile_map), got {tuple(tiles.shape)} {tiles.dtype}")
    cfg = config or default_config(head_dim, q.dtype)
    group = q_heads // kv_heads
    tile_tokens = cfg.tile_tokens(group)
    out = torch.empty(tokens, q_heads, head_dim, dtype=q.dtype, device=q.device)
    if tokens == 0 or tiles.shape[0] == 0:
        return out
    _prefill_kernel[(tiles.shape[0], kv_heads)](
        q, k, v, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, tiles, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, TILE_TOKENS=tile_tokens, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
        PAGE=page, DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
