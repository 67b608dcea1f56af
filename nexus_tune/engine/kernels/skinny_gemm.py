"""The LM head for a few rows (decode batches, last prompt tokens): y = x @ W.T, bound by W's bytes.

At 64 rows cuBLAS reads Llama-3.1-8B's 1 GB LM head at 3.4 TB/s on an H200's 132 SMs and at 2.8 TB/s
on a 92-SM decode side; this kernel (one program per 128 columns of the vocabulary, 4 loads in
flight) read it at 4.2 and 4.0 TB/s in the same run (benchmarks/gemm_bench.py, docs/performance.md).
The layers' own projections stay on cuBLAS: there this kernel lost at 64 rows (o_proj 0.016 against
0.012 ms) because their N is too narrow to fill the GPU without splitting K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nexus_tune.engine.kernels.tiles import dot_precision

MAX_ROWS = 64  # above this cuBLAS's tiles win: the product is no longer bound by W's bytes alone


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 128
    block_k: int = 64
    num_stages: int = 4
    num_warps: int = 4


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no tile crosses K: masks by row only, so the loads stay vectorised
            x_ok, w_ok = m_ok[:, None], n_ok[:, None]
        else:
            x_ok, w_ok = m_ok[:, None] & (offs_k < K)[None, :], n_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_ok, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                  cfg: SkinnyConfig = SkinnyConfig()) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T -> [M, N] (into `out` when given), M <= MAX_ROWS."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns; weight {list(weight.shape)} needs {weight.shape[1]}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous along K")
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    _skinny_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
