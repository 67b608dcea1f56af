"""Triton kernels of the engine: KV write, paged decode and chunked-prefill attention, RMSNorm, RoPE,
SwiGLU, the LM head of a few rows.

Importing this package needs triton; off-GPU they run only under TRITON_INTERPRET=1 (tests).
"""
from nexus_tune.engine.kernels.decode_attention import DecodeConfig, decode_attention, num_kv_splits
from nexus_tune.engine.kernels.prefill_attention import PrefillConfig, default_config, max_tiles, prefill_attention, tile_map
from nexus_tune.engine.kernels.rms_norm import rms_norm
from nexus_tune.engine.kernels.rope import apply_rope
from nexus_tune.engine.kernels.silu_mul import silu_mul
from nexus_tune.engine.kernels.skinny_gemm import MAX_ROWS as SKINNY_MAX_ROWS
from nexus_tune.engine.kernels.skinny_gemm import SkinnyConfig, skinny_linear
from nexus_tune.engine.kernels.store_kv import store_kv

__all__ = ["SKINNY_MAX_ROWS", "DecodeConfig", "PrefillConfig", "SkinnyConfig", "apply_rope", "decode_attention", "default_config", "max_tiles", "num_kv_splits",
           "prefill_attention", "rms_norm", "silu_mul", "skinny_linear", "store_kv", "tile_map"]
