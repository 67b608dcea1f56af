"""Weights: a Hugging Face checkpoint folder, or seeded random weights for a named preset.

Random weights are generated straight on the target device (an 8B model in well under a
second on a GPU) and are deterministic for a (seed, device type) pair. Checkpoint tensors are
read with safetensors straight onto the device; q/k/v and gate/up are copied into their slice
of the fused projections. Every expected tensor must be present with the shape the config
implies, and every tensor present must be one the model knows: anything else is a
`CheckpointError` naming the tensor.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from nexus_tune.engine.config import PRESETS, ConfigError, ModelConfig, get_preset
from nexus_tune.engine.model import Transformer

INIT_STD = 0.02  # keeps activations finite and logits spread out through 48+ layers


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config or the supported architectures."""


def resolve_config(model: str | ModelConfig) -> ModelConfig:
    """The config of a preset name or of a checkpoint folder (a ModelConfig is its own)."""
    if isinstance(model, ModelConfig):
        return model
    if Path(model).is_dir():
        return ModelConfig.from_pretrained(model)
    if model in PRESETS:
        return get_preset(model)
    raise ConfigError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")


@torch.no_grad()
def load_model(model: str | ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """The transformer of a checkpoint folder, or of a preset / config with random weights under `seed`."""
    config = resolve_config(model)
    net = Transformer.empty(config, device, dtype)
    if _is_checkpoint(model):
        load_weights(net, iter_checkpoint(model, device))
    else:
        init_random_weights(net, seed)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def init_random_weights(model: Transformer, seed: int) -> None:
    """Normal(0, INIT_STD) for matrices and biases, 1 for norm weights, from one seeded generator."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, INIT_STD, generator=gen)


def _is_checkpoint(model: str | ModelConfig) -> bool:
    return isinstance(model, str) and Path(model).is_dir()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: those its index names, or every *.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the index names {', '.join(missing)}, which is not in the folder")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (other weight formats are not supported)")
    return files


def iter_checkpoint(folder: str | Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _hf_targets(model: Transformer) -> dict[str, torch.Tensor]:
    """Every Hugging Face tensor name (without the 'model.' prefix) -> the slice of our parameter it fills."""
    c = model.config
    fused = {
        "qkv_proj": [("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)],
        "gate_up_proj": [("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size)],
    }
    targets = {}
    for name, param in model.named_parameters():
        *path, module, kind = name.split(".")
        if module not in fused:
            targets[name] = param.data
            continue
        start = 0
        for hf_module, rows in fused[module]:
            targets[".".join([*path, hf_module, kind])] = param.data.narrow(0, start, rows)
            start += rows
    return targets


@torch.no_grad()
def load_weights(model: Transformer, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (HF name, tensor) pairs into the model; fails on a missing, unknown or misshapen tensor."""
    targets = _hf_targets(model)
    for hf_name, tensor in tensors:
        name = hf_name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.lm_head is None):
            continue  # recomputed from the config / tied to the embedding
        dst = targets.pop(name, None)
        if dst is None:
            raise CheckpointError(f"unexpected tensor {hf_name!r}: not part of a {model.config.model_type} model "
                                  "with this config")
        if tuple(tensor.shape) != tuple(dst.shape):
            raise CheckpointError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                  f"but the config implies {tuple(dst.shape)}")
        dst.copy_(tensor)
    if targets:
        names = sorted(targets)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {', '.join(names[:5])}{more}")
