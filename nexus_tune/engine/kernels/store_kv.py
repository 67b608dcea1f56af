"""Write the new tokens' K and V into the paged cache, one program per token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                     NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAGE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    # slot -1 marks a padding row of a CUDA-graph batch: nothing to write.
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)[:, None]
        offs_d = tl.arange(0, HEAD_DIM)[None, :]
        ok = heads < NUM_HEADS
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + heads * stride_ch + offs_d
        k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + offs_d, mask=ok)
        v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + offs_d, mask=ok)
        tl.store(k_cache + dst, k, mask=ok)
        tl.store(v_cache + dst, v, mask=ok)


def check_store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Clear errors for a KV write the kernels cannot do (store_kv's, and apply_rope's fused one)."""
    if v is None or v_cache is None or slot_mapping is None:
        raise ValueError("a KV write needs k, v, both caches and slot_mapping")
    tokens, heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} / caches {tuple(k_cache.shape)} disagree")
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (heads, head_dim):
        raise ValueError(f"cache {tuple(k_cache.shape)} is not [num_blocks, block_size, {heads}, {head_dim}]")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"k/v dtype {k.dtype} differs from the cache's {k_cache.dtype}")
    if head_dim & (head_dim - 1) or k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("head_dim must be a power of two and contiguous in k, v and the caches")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} does not match {tokens} tokens")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (views of a fused QKV output are fine); caches [num_blocks, block_size, Hkv, D];
    slot_mapping [T] int64, slot = block * block_size + offset, -1 = skip."""
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=heads, BLOCK_H=triton.next_power_of_2(heads), HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        num_warps=4 if heads * head_dim >= 2048 else 1)
