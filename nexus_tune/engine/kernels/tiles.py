"""The inner loop shared by the decode and prefill attention kernels.

A run of query rows of one KV head (its query heads for decode, (token, query head) pairs for
prefill) attends to KV positions [lo, hi) of one sequence. With PAGED they are read from the
paged cache `[num_blocks, PAGE, Hkv, D]` through the sequence's block-table row: a KV tile of
BLOCK_N positions may span several pages, so each row of the tile looks up its own page id (a gather).
Without it they are rows `row_base + position` of a contiguous [T, Hkv, D] tensor (a prefill
chunk's own K/V, fresh from the projection): plain strided loads.
Softmax is online in base 2 (`qk_scale` already holds log2(e)), accumulation in fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Mask modes of `attend_tiles`: every tile is full; positions >= hi are masked; and, in
# addition, key positions after the query's own position are masked (causal).
FULL: tl.constexpr = tl.constexpr(0)
BOUNDED: tl.constexpr = tl.constexpr(1)
CAUSAL: tl.constexpr = tl.constexpr(2)

# Start value of the running max: finite, so a row that has seen only masked keys keeps
# exp2(-inf - m) = 0 instead of NaN, and an empty range ends with l = 0, never NaN.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@functools.lru_cache(maxsize=None)
def device_sms(device: torch.device) -> int:
    """The device's SM count (grids are sized from it); 132, an H100's, off-GPU (the interpreter)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (CPU tests, fp32 checks); 16-bit inputs use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Clear errors for shapes and dtypes the kernels do not handle."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D] with equal strides")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1) or head_dim != k_cache.shape[3]:
        raise ValueError(f"head_dim must be a power of two >= 16 shared by q and the cache, got {head_dim}")
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of KV heads ({k_cache.shape[2]})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q and the caches must share one of fp16/bf16/fp32, got {q.dtype}, {k_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")


@triton.jit
def attend_tiles(acc, l_i, m_i, q, q_pos, k_base, v_base, table_row, row_base, head_off,
                 lo, hi, stride_kb, stride_ks, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                 MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGED: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        kv_pos = start + offs_n
        valid = kv_pos < hi
        if PAGED:
            if MASK == FULL:
                page = tl.load(table_row + kv_pos // PAGE)
            else:
                # Table entries past the sequence may be garbage: never follow them.
                page = tl.load(table_row + kv_pos // PAGE, mask=valid, other=0)
            rows = page.to(tl.int64) * stride_kb + (kv_pos % PAGE) * stride_ks + head_off
        else:
            rows = (row_base + kv_pos).to(tl.int64) * stride_ks + head_off
        ptrs = rows[:, None] + offs_d[None, :]
        if MASK == FULL:
            k = tl.load(k_base + ptrs)
            v = tl.load(v_base + ptrs)
        else:
            k = tl.load(k_base + ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_base + ptrs, mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK == BOUNDED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        if MASK == CAUSAL:
            qk = tl.where(kv_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i
