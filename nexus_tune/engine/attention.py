"""Paged attention and KV writes: Triton kernels on CUDA, a plain PyTorch reference elsewhere.

The backend is an explicit choice (`"triton"` or `"torch"`), never a silent fallback, so GPU
tests can run both on the same inputs. The reference path gathers each sequence's pages
through its block table and does the softmax in float32; it is the definition the kernels
are tested against. The KV layout and the meaning of every field are in docs/architecture.md.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("triton", "torch")
_KERNEL_FUNCS = ("store_kv", "decode_attention", "prefill_attention", "rms_norm", "apply_rope", "silu_mul", "skinny_linear")


class BackendError(RuntimeError):
    """The requested backend cannot run here."""


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    `max_seq_len` (the reference path's gather width) and `num_sms` are host ints, known when the
    batch is built, so reading them costs no device sync; every kernel grid comes from shapes, so
    a step can be captured in a CUDA graph and replayed with new contents in the same tensors.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of every new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: KV length including the new tokens
    cu_seqlens_q: torch.Tensor | None  # [B+1] int32, prefill only
    max_seq_len: int
    tiles: torch.Tensor | None = None  # prefill on Triton: [N, 2] int32 tile map (engine.kernels.tile_map)
    num_sms: int | None = None  # the SMs the step runs on (a partition), None: the whole device
    # Prefill on Triton: [1] int32, the count of leading single-token sequences (a chunked mixed step's
    # decode rows) that the tile map leaves out and the split-KV decode kernel attends instead.
    decode_rows: torch.Tensor | None = None
    # Triton: the split-KV decode kernel's merge counters, zeroed once per step (the first layer's
    # call makes them; a graph replays that as one memset) and left zero by every launch.
    split_tickets: torch.Tensor | None = None

    def tickets(self, kv_heads: int) -> torch.Tensor:
        if self.split_tickets is None:
            self.split_tickets = torch.zeros(self.seq_lens.shape[0] * kv_heads, dtype=torch.int32,
                                             device=self.seq_lens.device)
        return self.split_tickets


@functools.cache
def triton_kernels() -> ModuleType:
    """nexus_tune.engine.kernels, checked for every entry point the engine calls."""
    try:
        import nexus_tune.engine.kernels as kernels
    except ImportError as e:
        raise BackendError(f"the Triton kernels cannot be imported ({e}); use backend='torch'") from e
    missing = [f for f in _KERNEL_FUNCS if not hasattr(kernels, f)]
    if missing:
        raise BackendError(f"nexus_tune.engine.kernels does not provide {', '.join(missing)}; use backend='torch'")
    return kernels


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA and the reference elsewhere; an impossible choice is an error."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise BackendError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if backend == "triton":
        # The Triton interpreter runs kernels on CPU tensors (slowly): useful to test kernels in CI.
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); use 'torch'")
        triton_kernels()
    return backend


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata, backend: str) -> None:
    """Write k, v [T, Hkv, D] into the caches at meta.slot_mapping."""
    if backend == "triton":
        triton_kernels().store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k.shape[1:]).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(num_slots, *v.shape[1:]).index_copy_(0, meta.slot_mapping, v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, backend: str) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence) -> [B, Hq, D]."""
    if backend == "triton":
        return triton_kernels().decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                                 num_sms=meta.num_sms, tickets=meta.tickets(k_cache.shape[2]))
    # Gather a fixed width (max_seq_len) and mask: no host sync, so this path is graph-capturable.
    k, v = _gather(k_cache, meta.block_tables, meta.max_seq_len), _gather(v_cache, meta.block_tables, meta.max_seq_len)
    keep = torch.arange(k.shape[1], device=q.device)[None, :] < meta.seq_lens[:, None]
    return _attend(q[:, None], k, v, keep[:, None, :], scale)[:, 0]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, backend: str) -> torch.Tensor:
    """q [T, Hq, D] packed over sequences -> [T, Hq, D]; causal, with each sequence's cached prefix.

    k, v [T, Hkv, D] are the new tokens' own keys and values, already stored in the caches too: the
    Triton kernel reads them from here (contiguous), the reference from the caches."""
    if backend == "triton":
        kernels = triton_kernels()
        out = kernels.prefill_attention(q, k, v, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                        meta.block_tables, meta.tiles, scale)
        if meta.decode_rows is not None:
            # A decode row in the prefill kernel walks its whole KV in one program per KV head; here its
            # KV is split across the GPU (a chunk of 261 tokens beside 6 rows over 16k KV took 2x).
            rows = min(q.shape[0], meta.seq_lens.shape[0])
            kernels.decode_attention(q[:rows], k_cache, v_cache, meta.block_tables[:rows], meta.seq_lens[:rows],
                                     scale, num_sms=meta.num_sms, num_rows=meta.decode_rows, out=out[:rows],
                                     tickets=meta.tickets(k_cache.shape[2]))
        return out
    out = torch.empty_like(q)
    cu, seq_lens = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist()  # reference path: syncs are fine
    for b, seq_len in enumerate(seq_lens):
        start, end = cu[b], cu[b + 1]
        k = _gather(k_cache, meta.block_tables[b : b + 1], seq_len)
        v = _gather(v_cache, meta.block_tables[b : b + 1], seq_len)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        keep = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        out[start:end] = _attend(q[None, start:end], k, v, keep[None], scale)[0]
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of each row's pages: [B, length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_tables[:, :num_blocks].long()].flatten(1, 2)[:, :length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, n, Hq, D], k/v [B, S, Hkv, D], keep [B, n, S] -> [B, n, Hq, D]; fp32 softmax, GQA by grouping."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, n, hkv, hq // hkv, d)
    scores = torch.einsum("bnhgd,bshd->bhgns", qg, k.float()) * scale
    scores = scores.masked_fill(~keep[:, None, None], float("-inf"))
    out = torch.einsum("bhgns,bshd->bnhgd", scores.softmax(-1), v.float())
    return out.reshape(b, n, hq, d).to(q.dtype)
