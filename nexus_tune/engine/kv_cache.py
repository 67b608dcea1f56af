"""The paged KV cache tensors, sized from the GPU memory left after the weights.

One allocation holds every layer's K and V, `[2, layers, num_blocks + 1, block_size, Hkv, D]`;
`k[i]` and `v[i]` are views of it, each `[num_blocks + 1, block_size, Hkv, D]` (the layout in
docs/architecture.md). Blocks `0 .. num_blocks - 1` belong to the block allocator; the extra last
block is scratch space that padded rows of a CUDA-graph batch write to and read from, so padding
never touches a live sequence and no kernel needs a "skip this slot" convention.
"""
from __future__ import annotations

import gc

import torch

from nexus_tune.engine.config import ModelConfig

# Without a GPU there is no "free memory" to fill: a fixed budget stands in for it.
CPU_KV_BYTES = 64 << 20
# cuBLAS workspaces, Triton and the CUDA-graph pool live outside the activation estimate.
GPU_FIXED_RESERVE_BYTES = 1 << 30


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        shape = (2, config.num_hidden_layers, num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        # Zeroed, not empty: profiling reads cache pages nobody wrote, and NaN garbage would poison it.
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.k = list(self.kv[0].unbind(0))
        self.v = list(self.kv[1].unbind(0))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block across all layers, K and V."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


def activation_bytes(config: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int, dtype: torch.dtype) -> int:
    """A generous bound on the transient memory of one prefill step and one decode step running at once.

    Per token: the residual stream and hidden state, the fused qkv and its float32 RoPE temporaries,
    and the MLP's gate_up plus its activation; per sequence: bf16 logits and the sampler's float32
    copies (softmax, sort values and int64 indices).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    qkv = config.q_size + 2 * config.kv_size
    per_token = elem * (4 * config.hidden_size + 2 * qkv + 4 * config.intermediate_size) + 4 * 3 * config.q_size
    per_seq = config.vocab_size * (elem + 4 * 4 + 8)
    tokens = max_num_batched_tokens + max_num_seqs  # a prefill chunk beside a full decode batch
    return int(1.5 * (tokens * per_token + 2 * max_num_seqs * per_seq))


def num_blocks_for_device(config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                          gpu_memory_utilization: float, reserve_bytes: int) -> int:
    """How many blocks fit: on CUDA, `utilization` of the card minus what is in use and the reserve."""
    per_block = KVCache.block_bytes(config, block_size, dtype)
    if device.type != "cuda":
        return max(1, CPU_KV_BYTES // per_block - 1)
    # Memory a previous runner of this process left in PyTorch's cache is free for this one: the
    # driver counts it as used until the cache lets it go (the caller drops that runner first).
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * gpu_memory_utilization) - (total - free) - reserve_bytes - GPU_FIXED_RESERVE_BYTES
    blocks = budget // per_block - 1  # minus the scratch block
    if blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
            f"{(reserve_bytes + GPU_FIXED_RESERVE_BYTES) / 2**30:.1f} GiB kept for activations; raise "
            f"gpu_memory_utilization ({gpu_memory_utilization}) or lower max_num_batched_tokens / max_num_seqs"
        )
    return blocks
