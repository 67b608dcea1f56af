"""Checkpoint folders (saved by transformers into tmp_path, nothing downloaded), presets, tokenizers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nexus_tune.engine.config import PRESETS, ConfigError, ModelConfig, get_preset
from nexus_tune.engine.loader import CheckpointError, load_model
from nexus_tune.engine.model_runner import ModelRunner
from nexus_tune.engine.step_inputs import PrefillInput
from nexus_tune.engine.tokenizer import ByteTokenizer, HFTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CPU = torch.device("cpu")
CHAT = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}" \
       "{% if add_generation_prompt %}[assistant]{% endif %}"


def write_tokenizer(folder) -> None:
    """A small byte-level BPE trained here, with the files a Hugging Face checkpoint carries."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                              "chat_template": CHAT}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))


def save_hf(preset: str, folder, **save_kwargs) -> torch.nn.Module:
    cfg = dict(PRESETS[preset])
    classes = {"LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[cfg["architectures"][0]]
    torch.manual_seed(0)
    model = model_cls(config_cls(**cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and norms off their trivial init
    model.save_pretrained(folder, **save_kwargs)
    write_tokenizer(folder)
    return model


@pytest.mark.parametrize("preset,save_kwargs", [("tiny", {"max_shard_size": "100KB"}), ("tiny-qwen2", {})])
def test_checkpoint_round_trip(tmp_path, preset, save_kwargs):
    hf = save_hf(preset, tmp_path, **save_kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(save_kwargs)
    runner = ModelRunner(str(tmp_path), device="cpu", num_kv_blocks=16)
    assert runner.config.config_hash() == get_preset(preset).config_hash()
    ids = runner.tokenizer.encode("hello world, the fox")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    got = runner.prefill(PrefillInput([ids], [0], [[0, 1]]))[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _corrupt(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tmp_path):
    save_hf("tiny-qwen2", tmp_path)
    _corrupt(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing layers\.1\.self_attn\.k_proj\.bias"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_wrong_shape_is_named(tmp_path):
    save_hf("tiny-qwen2", tmp_path)
    _corrupt(tmp_path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*\(100, 64\).*\(160, 64\)"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_unexpected_tensor_is_named(tmp_path):
    save_hf("tiny-qwen2", tmp_path)
    _corrupt(tmp_path, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(160, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(PRESETS["tiny"], architectures=["MistralForCausalLM"])))
    with pytest.raises(ConfigError, match="unsupported architecture 'MistralForCausalLM'"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path), CPU, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"]))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(str(tmp_path), CPU, torch.float32)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="part-1.safetensors"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_model("llama-9000", CPU, torch.float32)


def test_unsupported_rope_scaling():
    cfg = dict(PRESETS["tiny"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf_dict(cfg, name="x")


@pytest.mark.parametrize("preset,params", [("llama-3.1-8b", 8.03e9), ("qwen2.5-0.5b", 0.494e9),
                                           ("qwen2.5-3b", 3.09e9), ("qwen2.5-14b", 14.77e9)])
def test_presets_have_the_published_sizes(preset, params):
    assert get_preset(preset).num_params() == pytest.approx(params, rel=0.005)


def test_transformers5_config_format_parses_the_same():
    """transformers >= 5 writes rope_theta/rope_scaling as rope_parameters; both read the same."""
    hf = transformers.LlamaConfig(**PRESETS["llama-3.1-8b"]).to_dict()
    assert "rope_parameters" in hf
    assert ModelConfig.from_hf_dict(hf, "x") == ModelConfig.from_hf_dict(PRESETS["llama-3.1-8b"], "x")


def test_hf_tokenizer(tmp_path):
    write_tokenizer(tmp_path)
    tok = HFTokenizer(tmp_path, get_preset("tiny"))
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_token_id == 0
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token_id == 1
    assert tok.stop_token_ids == {1, 2, 257}  # tokenizer_config, generation_config, config.json
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == "[user] hi</s>[assistant]"
    assert tok.apply_chat_template(chat, tokenize=True)[0] != tok.bos_token_id  # the template owns specials


def test_byte_tokenizer():
    tok = ByteTokenizer(get_preset("tiny"))
    ids = tok.encode("héllo")
    assert ids[0] == 256 and ids[1:] == list("héllo".encode())
    assert tok.decode(ids) == "héllo"
    assert tok.decode([300, 257]) == chr(32 + 300 % 95)  # any non-byte id shows as one character
    assert tok.stop_token_ids == {257}
    assert ByteTokenizer(get_preset("tiny-qwen2")).encode("a") == [97]  # Qwen adds no BOS
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "x"}])
