"""The model against transformers, and the paged attention reference against plain attention.

Everything runs in float32 on the CPU with the PyTorch reference backend. Logits must match
transformers within rtol = atol = 1e-4 (the two differ only in summation order).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nexus_tune.engine.attention import AttentionMetadata, decode_attention, prefill_attention, store_kv
from nexus_tune.engine.config import PRESETS, ModelConfig, get_preset
from nexus_tune.engine.loader import load_weights
from nexus_tune.engine.model import Transformer
from nexus_tune.engine.model_runner import ModelRunner
from nexus_tune.engine.step_inputs import DecodeInput, PrefillInput

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-4, atol=1e-4)


def hf_model(preset: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model of the preset's config with every weight random (norms and biases too)."""
    cfg = dict(PRESETS[preset])
    cls = {"LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[cfg["architectures"][0]]
    config = cls[0](**cfg, attn_implementation="eager")
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def runner_with_weights(preset: str, hf: torch.nn.Module) -> ModelRunner:
    runner = ModelRunner(preset, device="cpu", num_kv_blocks=64)
    load_weights(runner.model, hf.state_dict().items())
    return runner


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_logits_match_transformers(preset):
    """Prefill of a prompt, then token-by-token decode, against one transformers forward pass."""
    hf = hf_model(preset)
    runner = runner_with_weights(preset, hf)
    ids = torch.randint(0, runner.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    table = [3, 7, 1]  # out of order on purpose: pages, not contiguous memory
    prompt = 21
    got = [runner.prefill(PrefillInput([ids[:prompt]], [0], [table]))[0]]
    for pos in range(prompt, len(ids)):
        got.append(runner.decode(DecodeInput([ids[pos]], [pos], [table]))[0])
    torch.testing.assert_close(torch.stack(got), expected[prompt - 1:], **TOL)


def test_untied_and_tied_heads():
    assert Transformer(get_preset("tiny")).lm_head is not None
    assert Transformer(get_preset("tiny-qwen2")).lm_head is None
    assert Transformer(get_preset("tiny-qwen2")).layers[0].self_attn.qkv_proj.bias is not None


def _paged(k, v, seq_lens, block_size, gen):
    """Scatter contiguous per-sequence K/V [B, S, H, D] into shuffled pages; returns caches and tables."""
    b, s, h, d = k.shape
    per_seq = -(-s // block_size)
    pages = torch.randperm(b * per_seq + 3, generator=gen)
    tables = pages[: b * per_seq].view(b, per_seq).to(torch.int32)
    k_cache = torch.zeros(b * per_seq + 3, block_size, h, d)
    v_cache = torch.zeros_like(k_cache)
    pos = torch.arange(s)
    for i, n in enumerate(seq_lens):
        slots = (tables[i, pos[:n] // block_size].long() * block_size + pos[:n] % block_size)
        meta = AttentionMetadata(True, slots, tables, torch.tensor(seq_lens, dtype=torch.int32), None, 0, 0)
        store_kv(k[i, :n], v[i, :n], k_cache, v_cache, meta, "torch")
    return k_cache, v_cache, tables


def _contiguous_attention(q, k, v, q_start):
    """q [n, Hq, D] at positions q_start.., k/v [S, Hkv, D]: causal SDPA with GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = torch.arange(k.shape[0])[None, :] <= (q_start + torch.arange(q.shape[0]))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def test_paged_attention_equals_contiguous():
    gen = torch.Generator().manual_seed(0)
    seq_lens, q_lens, hq, hkv, d, bs = [37, 5, 16], [12, 5, 1], 8, 2, 16, 4
    k = torch.randn(3, max(seq_lens), hkv, d, generator=gen)
    v = torch.randn(3, max(seq_lens), hkv, d, generator=gen)
    k_cache, v_cache, tables = _paged(k, v, seq_lens, bs, gen)
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    cu = torch.tensor([0, 12, 17, 18], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.empty(0, dtype=torch.long), tables, torch.tensor(seq_lens, dtype=torch.int32),
                             cu, max(seq_lens))
    unused = torch.full((sum(q_lens), hkv, d), float("nan"))  # the reference reads the new tokens from the cache
    out = prefill_attention(q, unused, unused, k_cache, v_cache, meta, d ** -0.5, "torch")
    for i, (n, m) in enumerate(zip(seq_lens, q_lens)):
        ref = _contiguous_attention(q[cu[i]:cu[i + 1]], k[i, :n], v[i, :n], n - m)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref, **TOL)

    qd = torch.randn(3, hq, d, generator=gen)
    meta = AttentionMetadata(False, torch.empty(0, dtype=torch.long), tables, meta.seq_lens, None, max(seq_lens))
    out = decode_attention(qd, k_cache, v_cache, meta, d ** -0.5, "torch")
    for i, n in enumerate(seq_lens):
        torch.testing.assert_close(out[i], _contiguous_attention(qd[i:i + 1], k[i, :n], v[i, :n], n - 1)[0], **TOL)


def test_chunked_prefill_equals_one_shot():
    runner = ModelRunner("tiny-qwen2", device="cpu", num_kv_blocks=64)
    ids = torch.randint(0, 384, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    one_shot = runner.prefill(PrefillInput([ids], [0], [[0, 1, 2]]))
    table = [10, 4, 8]
    for start, end in [(0, 7), (7, 23), (23, 45)]:
        chunked = runner.prefill(PrefillInput([ids[start:end]], [start], [table]))
    torch.testing.assert_close(chunked, one_shot, **TOL)
    nxt = int(one_shot.argmax())
    a = runner.decode(DecodeInput([nxt], [45], [[0, 1, 2]]))
    b = runner.decode(DecodeInput([nxt], [45], [table]))
    torch.testing.assert_close(a, b, **TOL)


def test_batched_steps_equal_single_sequences():
    """Packing sequences into one prefill (mixed prefixes) and one decode changes no sequence's logits."""
    runner = ModelRunner("tiny", device="cpu", num_kv_blocks=64)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 30, 17)]
    tables = [[0, 1], [2, 3], [4, 5]]
    # Sequence 1 first gets a 20-token prefix on its own, so the batch mixes prefix lengths.
    runner.prefill(PrefillInput([prompts[1][:20]], [0], [tables[1]]))
    batch = runner.prefill(PrefillInput([prompts[0], prompts[1][20:], prompts[2]], [0, 20, 0], tables))
    alone = [runner.prefill(PrefillInput([p], [0], [[10 + 2 * i, 11 + 2 * i]])) for i, p in enumerate(prompts)]
    torch.testing.assert_close(batch, torch.cat(alone), **TOL)
    tokens = batch.argmax(-1).tolist()
    dec = runner.decode(DecodeInput(tokens, [len(p) for p in prompts], tables))
    for i, p in enumerate(prompts):
        single = runner.decode(DecodeInput([tokens[i]], [len(p)], [[10 + 2 * i, 11 + 2 * i]]))
        torch.testing.assert_close(dec[i:i + 1], single, **TOL)


def test_random_init_stays_finite_and_spread_through_many_layers():
    """48 layers at the init scale: no inf/NaN, logits neither collapsed nor one-hot."""
    config = ModelConfig.from_hf_dict(
        dict(PRESETS["tiny"], num_hidden_layers=48, hidden_size=256, intermediate_size=768,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32), name="deep")
    runner = ModelRunner(config, device="cpu", num_kv_blocks=16)
    logits = runner.prefill(PrefillInput([list(range(100))], [0], [list(range(7))]))[0]
    assert torch.isfinite(logits).all()
    probs = logits.softmax(-1)
    assert 0.3 < logits.std() < 10
    assert probs.max() < 0.5


def test_random_weights_are_deterministic():
    a = ModelRunner("tiny", device="cpu", num_kv_blocks=4, seed=7).model.state_dict()
    b = ModelRunner("tiny", device="cpu", num_kv_blocks=4, seed=7).model.state_dict()
    c = ModelRunner("tiny", device="cpu", num_kv_blocks=4, seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mlp.gate_up_proj.weight"], c["layers.0.mlp.gate_up_proj.weight"])
    assert torch.equal(a["norm.weight"], torch.ones_like(a["norm.weight"]))


def test_triton_backend_matches_reference_in_interpreter():
    """The Triton kernels wired into the model (run by Triton's CPU interpreter) give the same logits."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA test in test_model_runner.py")
    ref = ModelRunner("tiny-qwen2", device="cpu", num_kv_blocks=16, backend="torch")
    tri = ModelRunner("tiny-qwen2", device="cpu", num_kv_blocks=16, backend="triton")
    ids = list(range(40, 63))
    batch = PrefillInput([ids[:15], ids], [0, 0], [[0], [1, 2]])
    torch.testing.assert_close(tri.prefill(batch), ref.prefill(batch), **TOL)
    step = DecodeInput([5, 6], [15, 23], [[0], [1, 2]])
    torch.testing.assert_close(tri.decode(step), ref.decode(step), **TOL)
    # A chunked mixed step: two decode rows first (the split-KV decode kernel), then a fresh prompt.
    mixed = PrefillInput([[7], [8], ids[:9]], [16, 24, 0], [[0, 4], [1, 2], [3]])
    torch.testing.assert_close(tri.prefill(mixed), ref.prefill(mixed), **TOL)
