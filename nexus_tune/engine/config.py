"""`ModelConfig`: the Hugging Face config fields the engine needs, and the named presets.

A preset is the published `config.json` of the model, verbatim in the fields that shape the
network, so a random-weight preset has exactly the real model's tensors, FLOPs and bytes.
`tiny` and `tiny-qwen2` are small enough for CPU tests and still exercise every feature
(GQA, Llama-3 rope scaling, Qwen2's qkv bias, tied embeddings).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# HF `architectures[0]` -> our model family.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class ConfigError(ValueError):
    """A config the engine cannot run: unknown architecture, unsupported rope scaling, bad fields."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # Llama-3 style, or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v projections (not on o_proj)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count; without embeddings it is the weights every token multiplies through."""
        h, i = self.hidden_size, self.intermediate_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size) * self.qkv_bias
        layer = qkv + self.q_size * h + 3 * h * i + 2 * h
        total = self.num_hidden_layers * layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def config_hash(self) -> str:
        """A short hash of the fields that define the network (not its name or special tokens), so a
        random-weight preset and the real checkpoint of the same model share profiles."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("name", "bos_token_id", "eos_token_ids")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        model_type = ARCHITECTURES.get(arch) if arch else d.get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ConfigError(
                f"{name}: unsupported architecture {arch or d.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        try:
            heads = d["num_attention_heads"]
            hidden = d["hidden_size"]
            # transformers >= 5 writes rope_theta and rope_scaling together as rope_parameters.
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ConfigError(f"{name}: unsupported rope scaling {rope_type!r} (supported: llama3)")
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                name=name,
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or hidden // heads,
                rms_norm_eps=float(d["rms_norm_eps"]),
                rope_theta=theta,
                rope_scaling=rope if rope_type == "llama3" else None,
                max_position_embeddings=d["max_position_embeddings"],
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 always has qkv bias (transformers hard-codes it); Llama has it if configured.
                qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"{name}: config is missing the field {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
        return cls.from_hf_dict(json.loads(path.read_text()), name=Path(folder).name)


def _llama(**overrides: Any) -> dict[str, Any]:
    d = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "vocab_size": 128256,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    return d | overrides


def _qwen2(**overrides: Any) -> dict[str, Any]:
    d = {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
         "rope_theta": 1000000.0}
    return d | overrides


# Published config.json files (the base models), restricted to the fields that matter here.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(),
    "qwen2.5-0.5b": _qwen2(hidden_size=896, intermediate_size=4864, max_position_embeddings=32768,
                           num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2,
                           rms_norm_eps=1e-06, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-3b": _qwen2(hidden_size=2048, intermediate_size=11008, max_position_embeddings=32768,
                         num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=2,
                         rms_norm_eps=1e-06, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-14b": _qwen2(hidden_size=5120, intermediate_size=13824, max_position_embeddings=131072,
                          num_attention_heads=40, num_hidden_layers=48, num_key_value_heads=8,
                          rms_norm_eps=1e-05, tie_word_embeddings=False, vocab_size=152064),
    # CPU-test sizes; vocab 384 leaves room for the 256 byte ids plus specials.
    "tiny": _llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, vocab_size=384,
                   bos_token_id=256, eos_token_id=257,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64, "rope_type": "llama3"}),
    "tiny-qwen2": _qwen2(hidden_size=64, intermediate_size=160, max_position_embeddings=1024,
                         num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=1,
                         rms_norm_eps=1e-06, tie_word_embeddings=True, vocab_size=384,
                         bos_token_id=256, eos_token_id=256),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dict(PRESETS[name], name=name)
