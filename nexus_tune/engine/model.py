"""The Llama 3.x / Qwen2 decoder, top to bottom (gpt-fast style).

Tokens of all sequences in a step are packed into one dimension ([T, hidden]); the attention
metadata says which sequence each belongs to and where its K/V live in the paged cache.
q/k/v and gate/up are each one fused projection (one GEMM). The residual add rides inside the
next RMSNorm (one fused kernel on the Triton backend). RoPE's cos/sin table is precomputed
for every position, so a step only indexes it (the Triton kernel rotates q and k in place and
writes the new K/V into the cache, in one launch). Nothing here reads a value back to the host.
On the Triton backend SwiGLU's silu(gate) * up is one kernel, and the LM head of a few rows (decode
batches) runs through a Triton kernel that reads its weight faster than cuBLAS does at that shape.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nexus_tune.engine.attention import AttentionMetadata, decode_attention, prefill_attention, store_kv, triton_kernels
from nexus_tune.engine.config import ModelConfig
from nexus_tune.engine.kv_cache import KVCache


def rope_cos_sin(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """[max_positions, head_dim]: cos of every (position, frequency) then sin, in float32 (as HF)."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    if config.rope_scaling is not None:
        inv_freq = _llama3_inv_freq(inv_freq, config.rope_scaling)
    positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: slow down low frequencies by `factor`, keep high ones, blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, backend: str,
               store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the two halves of every head (Llama's non-interleaved layout); q [T, Hq, D], k [T, Hkv, D].
    With `store` (v, k_cache, v_cache, meta) the rotated k and v are also written into the caches."""
    if backend == "triton":  # in place, one launch (the KV write included)
        if store is None:
            return triton_kernels().apply_rope(q, k, positions, cos_sin)
        v, k_cache, v_cache, meta = store
        return triton_kernels().apply_rope(q, k, positions, cos_sin, v=v, k_cache=k_cache, v_cache=v_cache,
                                           slot_mapping=meta.slot_mapping)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if store is not None:
        store_kv(k, *store, backend)
    return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(x + residual) and the new residual stream x + residual (x itself when residual is None)."""
        if self.backend == "triton":
            out, new_residual = triton_kernels().rms_norm(x, self.weight, self.eps, residual)
            return out, x if residual is None else new_residual
        if residual is not None:
            x = x + residual
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * out.to(x.dtype), x


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, run_attention: bool = True) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, k, positions, cos_sin, self.backend, (v, k_cache, v_cache, meta) if run_attention else None)
        if run_attention:
            if meta.is_prefill:
                out = prefill_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.backend)
            else:
                out = decode_attention(q, k_cache, v_cache, meta, self.scale, self.backend)
        else:
            out = q  # dense-only profiling: same shapes into o_proj, no attention op
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.backend == "triton":
            return self.down_proj(triton_kernels().silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                run_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, k_cache, v_cache, meta, run_attention)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # Not a buffer: it stays float32 whatever dtype the weights take.
        self.rope_cache = rope_cos_sin(config)
        self.backend = "torch"

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> "Transformer":
        """Uninitialised weights allocated straight on the device: no CPU copy, no default init pass."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.rope_cache = rope_cos_sin(config, device)
        return model

    def set_backend(self, backend: str) -> None:
        """'triton' or 'torch' for every attention, norm, activation and LM-head op (resolve it with
        attention.resolve_backend)."""
        self.backend = backend
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, run_attention: bool = True) -> torch.Tensor:
        """Packed tokens [T] at positions [T] -> final-normed hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rope_cache, kv_cache.k[i], kv_cache.v[i], meta,
                                run_attention)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the weights' dtype (into `out` when given)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.backend == "triton" and hidden.shape[0] <= triton_kernels().SKINNY_MAX_ROWS:
            return triton_kernels().skinny_linear(hidden, weight, out)
        return torch.matmul(hidden, weight.t(), out=out)
