"""RMSNorm with the residual add fused in front of it, one program per row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        # The stream carries the sum in the model dtype (as HF's `residual + hidden` does):
        # normalise that rounded value so the fused and unfused paths agree.
        x_rounded = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x_rounded, mask=ok)
        x = x_rounded.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # HF rounds the normalised value to the model dtype before the weight multiply; so do we.
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[rows, hidden] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out = RMSNorm(x + residual) * weight over the last dim, fp32 math.

    Returns (out, residual_out): residual_out = x + residual in x's dtype, or x itself when
    no residual is given (the first layer).
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)}/{residual.dtype} differs from x {tuple(x.shape)}/{x.dtype}")
    x2 = _rows(x, hidden)
    out = torch.empty_like(x2)
    res2 = _rows(residual, hidden) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else x2
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16))
    residual_out = res_out.view(x.shape) if residual is not None else x
    return out.view(x.shape), residual_out
