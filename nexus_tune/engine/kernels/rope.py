"""Rotary position embedding (neox / HF Llama-Qwen2 rotate-half), in place on q and k.

One program per token rotates all its query and key heads: on a decode step this replaces the
half-dozen small PyTorch kernels (gather cos/sin, split, negate, concat, two multiply-adds) per
layer with one launch and one pass over q and k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(ptr, stride_h, num_heads, cos, sin, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs = tl.arange(0, HALF)[None, :]
    ok = heads < num_heads
    p1 = ptr + heads * stride_h + offs
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=ok)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, positions, cos_sin, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                 Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(positions + t).to(tl.int64)
    offs = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin + pos * stride_c + offs).to(tl.float32)
    sin = tl.load(cos_sin + pos * stride_c + HALF + offs).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, Q_HEADS, cos, sin, BLOCK_QH, HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, KV_HEADS, cos, sin, BLOCK_KH, HALF)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (views of a fused QKV output are fine).

    positions [T] (int32/int64); cos_sin_cache [max_pos, D]: row p holds cos(p * inv_freq) in
    its first D/2 entries and sin(p * inv_freq) in its last D/2 (any float dtype; math in fp32).
    Returns (q, k) for chaining.
    """
    tokens, q_heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim or positions.shape != (tokens,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_pos, {head_dim}] with contiguous rows, got {tuple(cos_sin_cache.shape)}")
    if head_dim < 2 or head_dim & (head_dim - 1) or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("head_dim must be a power of two and contiguous in q and k")
    if tokens > 0:
        _rope_kernel[(tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), Q_HEADS=q_heads, KV_HEADS=k.shape[1],
            BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2, num_warps=4)
    return q, k
