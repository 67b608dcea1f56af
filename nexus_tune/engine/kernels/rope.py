"""Rotary position embedding (neox / HF Llama-Qwen2 rotate-half), in place on q and k; optionally
the KV write in the same pass.

One program per token rotates all its query and key heads: on a decode step this replaces the
half-dozen small PyTorch kernels (gather cos/sin, split, negate, concat, two multiply-adds) per
layer with one launch and one pass over q and k. Given the caches it also writes the rotated k and
the token's v at its cache slot, so the KV write costs no launch of its own (on the H200 the two
kernels took 0.12 ms of a 9.4 ms llama-3.1-8b decode step, 32 launches each; docs/performance.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nexus_tune.engine.kernels.store_kv import check_store_kv


@triton.jit
def _rotate_heads(ptr, stride_h, num_heads, cos, sin, cache_ptr, stride_ch, cache_heads, BLOCK_H: tl.constexpr,
                  HALF: tl.constexpr, STORE_KV: tl.constexpr):
    """Rotate `num_heads` heads at ptr in place; with STORE_KV also write the first `cache_heads` at cache_ptr."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    ok = heads < num_heads
    p1 = ptr + heads * stride_h + offs
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=ok, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(ptr.dtype.element_ty)
    tl.store(p1, y1, mask=ok)
    tl.store(p1 + HALF, y2, mask=ok)
    if STORE_KV:
        c1 = cache_ptr + heads * stride_ch + offs
        tl.store(c1, y1, mask=heads < cache_heads)
        tl.store(c1 + HALF, y2, mask=heads < cache_heads)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, positions, cos_sin, k_cache, v_cache, slot_mapping,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c, stride_cb, stride_cs,
                 stride_ch, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, STORE_KV: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(positions + t).to(tl.int64)
    offs = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin + pos * stride_c + offs).to(tl.float32)
    sin = tl.load(cos_sin + pos * stride_c + HALF + offs).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, Q_HEADS, cos, sin, q_ptr, 0, 0, BLOCK_QH, HALF, False)
    k_row = k_ptr + t * stride_kt
    if STORE_KV:
        slot = tl.load(slot_mapping + t).to(tl.int64)
        # slot -1 marks a padding row of a CUDA-graph batch: no head is written.
        cache_heads = tl.where(slot >= 0, KV_HEADS, 0)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs
        _rotate_heads(k_row, stride_kh, KV_HEADS, cos, sin, k_cache + dst, stride_ch, cache_heads, BLOCK_KH, HALF, True)
        heads = tl.arange(0, BLOCK_KH)[:, None]
        d = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + d, mask=heads < cache_heads)
        tl.store(v_cache + dst + heads * stride_ch + d, v, mask=heads < cache_heads)
    else:
        _rotate_heads(k_row, stride_kh, KV_HEADS, cos, sin, k_row, 0, 0, BLOCK_KH, HALF, False)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
               v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (views of a fused QKV output are fine).

    positions [T] (int32/int64); cos_sin_cache [max_pos, D]: row p holds cos(p * inv_freq) in
    its first D/2 entries and sin(p * inv_freq) in its last D/2 (any float dtype; math in fp32).
    With v [T, Hkv, D], the caches [num_blocks, block_size, Hkv, D] and slot_mapping [T] int64 (slot =
    block * block_size + offset, -1 = skip), the rotated k and v are also written into the caches
    (what store_kv does). Returns (q, k) for chaining.
    """
    tokens, q_heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim or positions.shape != (tokens,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_pos, {head_dim}] with contiguous rows, got {tuple(cos_sin_cache.shape)}")
    if head_dim < 2 or head_dim & (head_dim - 1) or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("head_dim must be a power of two and contiguous in q and k")
    store = k_cache is not None
    if store:
        check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:  # the KV write's arguments: never read with STORE_KV off
        v, k_cache, v_cache, slot_mapping = k, k, k, positions
    if tokens > 0:
        _rope_kernel[(tokens,)](
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0), *k_cache.stride()[:3],
            Q_HEADS=q_heads, KV_HEADS=k.shape[1], BLOCK_QH=triton.next_power_of_2(q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), HALF=head_dim // 2,
            PAGE=k_cache.shape[1] if store else 1, STORE_KV=store, num_warps=4)
    return q, k
