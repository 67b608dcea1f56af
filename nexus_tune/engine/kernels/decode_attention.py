"""Paged decode attention, flash-decoding style: one query token per sequence.

One kernel runs one program per (sequence, KV head, KV split): it loads the query heads of that
KV head together (GQA grouping, so K/V are read once per KV head) and attends to its split of the
sequence's KV. A sequence in one split writes its output directly. Otherwise each split writes its
normalised partial output and log-sum-exp and takes a ticket (a counter per sequence and KV head);
the split that takes the last ticket merges the partials, in split order, and sets the counter back
to zero for the next launch. The merge used to be a second kernel: on the H200 it cost 0.28 ms of a
9.4 ms llama-3.1-8b decode step (64 x 2048 KV), mostly its launch and its chain of dependent loads
(docs/performance.md). The grid depends only on shapes (batch, heads, the block table's width),
never on sequence lengths, so the launch can be captured in a CUDA graph; each program finds its own
KV range from `seq_lens` on the device. A sequence of length 0 produces zeros. With `num_rows` (a
count on the device) only the first rows are attended and the rest of `out` is left as it is: the
decode rows of a chunked mixed step, which lead its packed batch, run here while the prefill kernel
takes the prompt chunks behind them (nexus_tune/engine/attention.py).

The grid's split count is an upper bound. How many splits a sequence really uses is decided on
the device from the lengths: every split holds about the same number of KV tokens (the batch's
total over the programs that fill the GPU), so a long document among short chat turns is cut
into many splits instead of holding the whole step up (on the H100 a 48-sequence batch with one
16k-token sequence took 1.8x a uniform batch of the same KV when each sequence had 2 splits:
benchmarks/decode_gap.py, since replaced by engine_overhead.py). Splits past a sequence's last one do nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nexus_tune.engine.kernels.tiles import BOUNDED, device_sms, FULL, NEG_BIG, attend_tiles, check_attention_inputs, dot_precision

MAX_SPLITS = 64        # the merging split reads every split's log-sum-exp at once
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, partial write) dominates
GRID_PER_SM = 64       # launched programs per SM at most (idle splits still cost a launch slot)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # KV positions per tile
    num_warps: int = 4
    num_stages: int = 3
    # Working programs per SM: enough bytes in flight to hide memory latency on a split side too
    # (H200, 64 x 2048 KV: 8 instead of 4 took 0.212 -> 0.173 ms on 92 SMs, 0.218 -> 0.198 on 68,
    # 0.151 -> 0.151 on all 132; docs/performance.md).
    programs_per_sm: int = 8
    # Registers per thread at most: 128 at 4 warps lets 4 programs share an SM. Left to itself the
    # compiler took 108 or 153 depending on the launch's specialisation (split bound, strides), and at
    # 153 only 3 fit: the H200 llama-3.1-8b decode step's attention took 4.76 instead of 4.33 ms
    # whenever max_model_len set the bound to 5 or 16 (docs/performance.md, decode_graph_factors.py).
    max_registers: int = 128


DEFAULT_DECODE = DecodeConfig()


def num_kv_splits(batch: int, kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """The grid's splits per (sequence, KV head), from shapes only (graph-safe): enough for the
    longest possible sequence to take its share of the GPU, within the launch budget."""
    launchable = triton.cdiv(GRID_PER_SM * num_sms, max(batch * kv_heads, 1))
    return max(1, min(launchable, triton.cdiv(max_kv_len, MIN_SPLIT_TOKENS), MAX_SPLITS))


@triton.jit
def _num_splits(lens, total, num_splits, programs_per_head):
    """Splits of sequences of `lens` tokens: the share of a program is the batch's `total` KV tokens over
    `programs_per_head`; a sequence takes its length over that share, rounded to the nearest count, at
    least 1 and at most `num_splits` (2,068 tokens over a share of 1,003: two splits, not 1,024 +
    1,024 + 20)."""
    share = tl.maximum(tl.cdiv(total, programs_per_head), 1)
    return tl.minimum(tl.maximum((lens + share // 2) // share, 1), num_splits)


@triton.jit
def _batch_kv(seq_lens, batch, num_rows, BLOCK_B: tl.constexpr, HAS_NUM_ROWS: tl.constexpr):
    """The batch's KV tokens (of its first `num_rows` rows with HAS_NUM_ROWS)."""
    offs = tl.arange(0, BLOCK_B)
    live = offs < batch
    if HAS_NUM_ROWS:
        live = live & (offs < tl.load(num_rows))
    return tl.sum(tl.load(seq_lens + offs, mask=live, other=0), 0)


@triton.jit
def _split_len(seq_len, total, num_splits, programs_per_head, BLOCK_N: tl.constexpr):
    """A sequence's split length in whole tiles: its length over its number of splits."""
    parts = _num_splits(seq_len, total, num_splits, programs_per_head)
    return tl.cdiv(tl.maximum(tl.cdiv(seq_len, parts), 1), BLOCK_N) * BLOCK_N


@triton.jit
def _split_kernel(q_ptr, k_cache, v_cache, block_tables, seq_lens, o_part, lse_part, out_ptr, tickets, qk_scale,
                  stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
                  stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                  num_splits, batch, num_rows, programs_per_head, kv_heads, GROUP: tl.constexpr,
                  BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, SPLITS_P2: tl.constexpr,
                  HAS_NUM_ROWS: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_NUM_ROWS:  # only the first rows, a count on the device
        if b >= tl.load(num_rows):
            return
    total = _batch_kv(seq_lens, batch, num_rows, BLOCK_B, HAS_NUM_ROWS)
    seq_len = tl.load(seq_lens + b)
    # Split length in whole tiles: only a split's last tile can be partial.
    split_len = _split_len(seq_len, total, num_splits, programs_per_head, BLOCK_N)
    if (split > 0) & (split * split_len >= seq_len):
        return  # past the sequence's last split (split 0 always writes: an empty sequence's zeros)
    used = tl.maximum(tl.cdiv(seq_len, split_len), 1)
    lo = tl.minimum(split * split_len, seq_len)
    hi = tl.minimum(lo + split_len, seq_len)
    full_hi = lo + (hi - lo) // BLOCK_N * BLOCK_N

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_h
    head_ok = offs_h < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    table_row = block_tables + b * stride_tb
    head_off = kv_head * stride_kh
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, offs_h, k_cache, v_cache, table_row, 0, head_off,
                                 lo, full_hi, stride_kb, stride_ks, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, FULL, DOT_PRECISION, True)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q, offs_h, k_cache, v_cache, table_row, 0, head_off,
                                 full_hi, hi, stride_kb, stride_ks, qk_scale,
                                 BLOCK_N, HEAD_DIM, PAGE, BOUNDED, DOT_PRECISION, True)
    # An empty range has l = 0: its output is 0 and its lse about -1e30, weight 0 in the merge.
    l_safe = tl.maximum(l_i, 1e-30)
    o = acc / l_safe[:, None]
    out_ptrs = out_ptr + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
    if used == 1:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = o_part + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        lse_row = lse_part + b * stride_lb + heads * stride_lh
        tl.store(part + split * stride_os, o, mask=head_ok[:, None])
        tl.store(lse_row + split, m_i + tl.log2(l_safe), mask=head_ok)
        # Every thread's partial is written before the ticket is taken (the barrier), and visible to
        # the program that takes the last one (acq_rel at GPU scope).
        tl.debug_barrier()
        ticket = tickets + b * kv_heads + kv_head
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == used - 1:
            _merge_splits(part, lse_row, out_ptrs, used, stride_os, head_ok, BLOCK_H, HEAD_DIM, SPLITS_P2)
            tl.atomic_xchg(ticket, 0)


@triton.jit
def _merge_splits(part, lse_row, out_ptrs, used, stride_os, head_ok,
                  BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):
    """The splits' partial outputs [BLOCK_H, HEAD_DIM] weighted by their share of the softmax, in split
    order (so the result does not depend on which split finished last). L1 is bypassed (.cg): the
    partials were written by other programs."""
    offs_s = tl.arange(0, SPLITS_P2)
    lse = tl.load(lse_row[:, None] + offs_s[None, :], mask=head_ok[:, None] & (offs_s[None, :] < used),
                  other=NEG_BIG, cache_modifier=".cg")
    m = tl.max(lse, 1)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    res = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for s in range(0, used):
        w = tl.exp2(tl.load(lse_row + s, mask=head_ok, other=NEG_BIG, cache_modifier=".cg") - m)
        res += w[:, None] * tl.load(part + s * stride_os, mask=head_ok[:, None], other=0.0, cache_modifier=".cg")
        total += w
    res = res / total[:, None]
    tl.store(out_ptrs, res.to(out_ptrs.dtype.element_ty), mask=head_ok[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     *, num_splits: int | None = None, num_sms: int | None = None,
                     num_rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     tickets: torch.Tensor | None = None, config: DecodeConfig = DEFAULT_DECODE) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV.

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (KV length including the current token) -> out [B, Hq, D] in q's dtype.
    `num_sms`: the SMs the launch runs on (a green-context partition; default the whole device),
    which sizes the KV splits. `num_rows` ([1] int32 on the device): attend rows [0, num_rows) only,
    leaving the rest of `out` unwritten (graph-safe: the count may change between replays). `out`:
    write there ([B, Hq, D], q's dtype) instead of a new tensor. `tickets`: at least B x Hkv int32
    zeros, left zero again (one buffer serves every layer of a step; default: zeroed here per call).
    Two launches must not share it at the same time. `num_splits` overrides the shape-based bound,
    `config` the tiles and the programs per SM (benchmarks, tests).
    """
    sms = num_sms or device_sms(q.device)
    check_attention_inputs(q, k_cache, v_cache)
    batch, q_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} "
                         f"do not match batch {batch}")
    if num_splits is None:
        num_splits = num_kv_splits(batch, kv_heads, block_tables.shape[1] * page, sms)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    group = q_heads // kv_heads
    if num_rows is not None and (num_rows.shape != (1,) or num_rows.dtype != torch.int32):
        raise ValueError(f"num_rows must be a [1] int32 tensor, got {tuple(num_rows.shape)} {num_rows.dtype}")
    if out is None:
        out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}")
    if tickets is None:
        tickets = torch.zeros(batch * kv_heads, dtype=torch.int32, device=q.device)
    elif tickets.dtype != torch.int32 or tickets.numel() < batch * kv_heads or not tickets.is_contiguous():
        raise ValueError(f"tickets must be >= {batch * kv_heads} contiguous int32, got {tickets.numel()} {tickets.dtype}")
    o_part = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out
    # Working programs per KV head: the batch's KV tokens are shared out among this many splits.
    programs_per_head = max(1, config.programs_per_sm * sms // kv_heads)
    rows = seq_lens if num_rows is None else num_rows  # without a count: a pointer never read
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse_part, out, tickets, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), num_splits, batch, rows,
        programs_per_head, kv_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=config.block_n, PAGE=page, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_B=triton.next_power_of_2(batch), SPLITS_P2=triton.next_power_of_2(num_splits),
        HAS_NUM_ROWS=num_rows is not None, num_warps=config.num_warps,
        num_stages=config.num_stages, maxnreg=config.max_registers)
    return out
