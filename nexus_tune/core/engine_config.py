"""`EngineConfig`: how an engine is set up, and every serving default, once.

The engine (nexus_tune/engine/llm.py) is built from one; the scheduler, the block manager, the simulator and
the command line read their defaults from its fields, so a default changes in one place. It lives
in the core because the simulator and the scheduler, which never import the engine, need the same
numbers as the engine they stand for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nexus_tune.core.controller import ControllerKnobs
    from nexus_tune.core.profile import Profile


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a preset name (random weights under `seed`) or a Hugging Face checkpoint folder
    policy: str = "nexus"  # nexus | chunked | prefill-first | static:N
    device: Any = "auto"  # "auto" (CUDA if there is one), "cuda[:N]", "cpu" or a torch.device
    profile: Profile | str | Path | None = None  # nexus: default profiles/<gpu-slug>/<model-slug>.json
    slo: str | dict | None = None  # "ttft=MS,tpot=MS": what nexus plans for (default: the knobs' own)
    knobs: ControllerKnobs | None = None  # default: the profile's tuned knobs, else derived from it
    max_num_seqs: int = 256  # sequences running at once (vLLM's default)
    max_model_len: int | None = None  # context length (default: the model's)
    mixed_token_budget: int = 8192  # chunked / prefill-first step budget: vLLM's max_num_batched_tokens
    block_size: int = 16  # KV tokens per block
    gpu_memory_utilization: float = 0.9  # share of the card the engine may fill (weights, KV, activations)
    num_kv_blocks: int | None = None  # default: what fits in gpu_memory_utilization
    seed: int = 0  # seed of a preset's random weights
    dtype: Any = None  # torch dtype of weights and KV cache (default: bf16 on a GPU, float32 on a CPU)
    step_log: bool = False  # keep per-step CUDA-event timings (EngineCore.step_records)
    online_update: bool | None = None  # feed step times to the controller (default: nexus on a GPU)
