"""ModelRunner: generation consistency, input checks, the PhaseRunner parts, and (CUDA only) graphs."""
from __future__ import annotations

import pytest
import torch

from nexus_tune.engine.kv_cache import CPU_KV_BYTES, KVCache
from nexus_tune.engine.model_runner import ModelRunner
from nexus_tune.engine.step_inputs import DecodeInput, DecodeRows, PrefillInput, Staging
from nexus_tune.engine.sampling import check_stop
from nexus_tune.core.runner import PhaseRunner
from nexus_tune.core.sequence import SamplingParams

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs and the Triton backend need a CUDA GPU")


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("tiny", device="cpu", num_kv_blocks=128)


def generate(runner: ModelRunner, prompt: list[int], table: list[int], params: SamplingParams) -> list[int]:
    """The loop the engine runs: prefill, then decode until check_stop says so."""
    out: list[int] = []
    logits = runner.prefill(PrefillInput([prompt], [0], [table]))
    while True:
        out += runner.sample(logits, [params], [len(out)])
        if check_stop(out, runner.tokenizer.decode(out), 1, params, runner.tokenizer.stop_token_ids):
            return out
        logits = runner.decode(DecodeInput([out[-1]], [len(prompt) + len(out) - 1], [table]))


def test_incremental_decode_equals_recomputing_the_prefix(runner):
    prompt = runner.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = generate(runner, prompt, [0, 1], params)
    assert len(tokens) == 12
    for i in range(len(tokens)):  # each greedy token from a fresh full prefill of everything before it
        logits = runner.prefill(PrefillInput([prompt + tokens[:i]], [0], [[5, 6]]))
        assert logits.argmax().item() == tokens[i]


def test_seeded_generation_is_reproducible(runner):
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert generate(runner, [256, 1, 2, 3], [0], params) == generate(runner, [256, 1, 2, 3], [9], params)


def test_bad_inputs_fail_clearly(runner):
    with pytest.raises(ValueError, match="cannot hold"):
        runner.prefill(PrefillInput([list(range(20))], [0], [[0]]))
    with pytest.raises(ValueError, match="max_model_len"):
        runner.decode(DecodeInput([1], [5000], [list(range(400))]))
    with pytest.raises(ValueError, match="at least one"):
        runner.prefill(PrefillInput([[]], [0], [[0]]))
    with pytest.raises(ValueError, match="exceeds the model"):
        ModelRunner("tiny", device="cpu", num_kv_blocks=4, max_model_len=10**6)


def test_graphs_need_cuda(runner):
    with pytest.raises(RuntimeError, match="CUDA device"):
        runner.capture_graphs({}, {0: (None, None)}, total_sms=132)


def test_kv_cache_size_on_cpu_comes_from_a_fixed_budget():
    r = ModelRunner("tiny", device="cpu")
    assert r.num_kv_blocks == CPU_KV_BYTES // KVCache.block_bytes(r.config, 16, torch.float32) - 1
    assert r.kv_cache.k[0].shape == (r.num_kv_blocks + 1, 16, 2, 16)  # + the scratch block


def test_runner_is_a_phase_runner(runner):
    assert isinstance(runner, PhaseRunner)
    assert runner.num_layers == 2


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_phase_parts(phase):
    """'dense' never touches the KV cache; 'attention' and 'all' write it; each callable reruns."""
    r = ModelRunner("tiny", device="cpu", num_kv_blocks=64)
    make = (lambda part: r.prefill_fn(48, 20, part)) if phase == "prefill" else (lambda part: r.decode_fn(4, 90, part))
    for part in ("dense", "attention", "all"):
        r.kv_cache.kv.zero_()
        fn = make(part)
        fn(None)
        fn(None)
        assert bool(r.kv_cache.kv.any()) == (part != "dense"), part
    with pytest.raises(ValueError, match="part must be"):
        make("mlp")


def test_profiling_more_kv_than_the_cache_holds_fails_clearly(runner):
    with pytest.raises(ValueError, match="KV blocks"):
        runner.decode_fn(64, 64 * 2048, "all")
    with pytest.raises(ValueError, match="at least one KV token"):
        runner.decode_fn(8, 4, "all")


def test_padded_graph_step_leaves_real_rows_and_other_blocks_alone():
    """The step every decode graph captures, run eagerly: 5 sequences padded to 8 rows give the
    eager logits, and the padding touches no KV block but the scratch block."""
    r = ModelRunner("tiny", device="cpu", num_kv_blocks=40, max_num_seqs=8, max_model_len=128)
    tables = [[2 * i, 2 * i + 1] for i in range(5)]
    prompts = [list(range(10 + i, 17 + 2 * i)) for i in range(5)]
    first = r.prefill(PrefillInput(prompts, [0] * 5, tables)).argmax(-1).tolist()
    batch = DecodeInput(first, [len(p) for p in prompts], tables)
    eager = r.decode(batch)
    before = r.kv_cache.kv.clone()
    r._decode_rows.load(batch, 8, r._decode_staging, None, r.max_model_len)
    r._decode_forward(r._decode_rows, 8, None, r.max_model_len, r._decode_logits)
    torch.testing.assert_close(r._decode_logits[:5], eager, rtol=1e-5, atol=1e-5)
    changed = (r.kv_cache.kv != before).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()
    own = {b for t in tables for b in t}  # rewritten with the same token (bits may differ: 8-row GEMMs)
    assert set(changed) - own == {r.kv_cache.scratch_block}


def test_decode_rows_follow_a_changing_batch_with_incremental_updates():
    """Rows joining, leaving, moving, growing a block, or coming back with new blocks (a preemption
    changes the key): after each step the device rows hold exactly what a full rebuild would."""
    rows = DecodeRows(max_rows=6, max_blocks=8, block_size=4, scratch_block=99, device=torch.device("cpu"))
    staging = Staging(torch.device("cpu"))
    tables = {"a": [3, 7], "b": [1], "c": [4, 5, 6], "d": [9, 10]}
    steps = [  # (keys, positions)
        (["a", "b", "c"], [5, 2, 9]),
        (["a", "c", "d"], [8, 10, 6]),       # b left (c and d move up), a needs a new block
        (["a", ("c", 1), "d"], [9, 3, 7]),   # c preempted: same id, new blocks
    ]
    for step, (keys, positions) in enumerate(steps):
        if step == 1:
            tables["a"].append(2)
        if step == 2:
            tables[("c", 1)] = [11]
        batch = DecodeInput([10 * i + 1 for i in range(len(keys))], positions, [tables[k] for k in keys], keys=keys)
        rows.load(batch, 4, staging, None, max_model_len=32)
        for i, (key, pos) in enumerate(zip(keys, positions)):
            need = pos // 4 + 1
            assert rows.block_tables[i, :need].tolist() == tables[key][:need], (step, key)
            table = tables[key]
            assert rows.tokens[:, i].tolist() == [10 * i + 1, pos, table[pos // 4] * 4 + pos % 4]
        assert rows.tokens[:, len(keys):4].tolist() == [[0], [0], [99 * 4]]  # padding: the scratch slot


def test_tokens_on_the_device_equal_tokens_from_the_host(runner):
    """A decode step (and a mixed prefill step) whose tokens come from the previous step's sampled
    ids on the device computes what the same step with the tokens on the host computes."""
    tables = [[0, 1], [2, 3]]
    prompts = [list(range(20, 31)), list(range(40, 47))]
    first = runner.prefill(PrefillInput(prompts, [0, 0], tables)).argmax(-1)
    positions = [len(p) for p in prompts]
    host = runner.decode(DecodeInput(first.tolist(), positions, tables)).clone()
    prev_ids = torch.stack([torch.tensor(7), first[1], first[0]])  # the previous step's ids, another order
    dev = runner.decode(DecodeInput([0, 0], positions, tables, src=[2, 1]), prev_ids=prev_ids)
    torch.testing.assert_close(dev, host)
    chunk = list(range(60, 65))
    mixed_host = runner.prefill(PrefillInput([[first[0].item()], chunk], [positions[0], 0], [tables[0], [4]]))
    mixed_dev = runner.prefill(PrefillInput([[0], chunk], [positions[0], 0], [tables[0], [4]], src=[2, -1]),
                               prev_ids=prev_ids)
    torch.testing.assert_close(mixed_dev, mixed_host)


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_runner() -> ModelRunner:
    return ModelRunner("tiny-qwen2", device="cuda", num_kv_blocks=256, max_num_seqs=16, max_model_len=256)


def _decode_batch(rows: int, runner: ModelRunner) -> DecodeInput:
    """`rows` sequences whose block tables all span max_model_len (as wide as the graphs' static table)."""
    width = runner.max_blocks_per_seq
    gen = torch.Generator().manual_seed(rows)
    lens = torch.randint(1, runner.max_model_len, (rows,), generator=gen).tolist()
    return DecodeInput(torch.randint(0, 256, (rows,), generator=gen).tolist(), [n - 1 for n in lens],
                       [list(range(i * width, (i + 1) * width)) for i in range(rows)])


@needs_cuda
def test_graph_decode_equals_eager(gpu_runner):
    r = gpu_runner
    r.kv_cache.kv.normal_()
    streams = {"a": torch.cuda.Stream(), "b": torch.cuda.Stream()}
    [report] = r.capture_graphs({}, {k: (s, None) for k, s in streams.items()}, total_sms=132,
                                 decode_buckets=[1, 4, 8, 16])
    assert report.num_graphs == 8 and report.seconds > 0

    def run(batch, key=None):  # logits are made on the split's stream: wait for it before reading
        out = r.decode(batch, key, stream=streams["a"])
        torch.cuda.synchronize()
        return out.float().clone()

    for rows in (1, 8, 16):  # a full bucket: the same kernels on the same shapes, so bit-identical
        batch = _decode_batch(rows, r)
        eager = run(batch)
        for key in streams:
            assert torch.equal(run(batch, key), eager), (rows, key)
    batch = _decode_batch(5, r)  # padded to the 8-bucket: the GEMMs see 8 rows, so compare closely
    eager, graph = run(batch), run(batch, "b")
    torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
    assert torch.equal(graph.argmax(-1), eager.argmax(-1))


@needs_cuda
def test_triton_backend_matches_torch_backend_on_gpu():
    ref = ModelRunner("tiny", device="cuda", num_kv_blocks=64, backend="torch", max_model_len=512)
    tri = ModelRunner("tiny", device="cuda", num_kv_blocks=64, backend="triton", max_model_len=512)
    ids = list(range(40, 140))
    batch = PrefillInput([ids[:30], ids], [0, 0], [[0, 1], [2, 3, 4, 5, 6, 7, 8]])
    # bf16: the kernels round P to bf16 before P @ V; the reference keeps fp32 until the output.
    torch.testing.assert_close(tri.prefill(batch).float(), ref.prefill(batch).float(), rtol=5e-2, atol=5e-2)
    step = DecodeInput([5, 6], [30, 100], [[0, 1], [2, 3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(tri.decode(step).float(), ref.decode(step).float(), rtol=5e-2, atol=5e-2)


@needs_cuda
def test_decode_fn_replays_on_a_stream(gpu_runner):
    """The profiler's callables do the step they name, on the stream they are handed. A step with
    attention writes every layer's K and V of its new tokens into the cache (a dense-only step none),
    the same values at every replay. The work is queued on the given stream: while a spinning kernel
    holds that stream, a copy taken on the default stream (not ordered after it) sees none of it."""
    r, stream = gpu_runner, torch.cuda.Stream()
    kv = r.kv_cache.kv
    makers = [(lambda part: r.decode_fn(8, 8 * 100, part, stream), 8),  # 8 sequences, one new token each
              (lambda part: r.prefill_fn(128, 64, part, stream), 128)]  # 128 new tokens after 64 cached
    for make, new_tokens in makers:
        for part in ("all", "attention", "dense"):
            fn = make(part)
            kv.zero_()
            torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(500_000_000)  # ~0.3 s of GPU cycles: far longer than the host's next lines
            fn(stream)
            early = kv.clone()
            stream.synchronize()
            written = kv.clone()
            fn(stream)
            stream.synchronize()
            # Token slots written per (K or V, layer), the padding's scratch block left out.
            slots = (written[:, :, :r.kv_cache.scratch_block] != 0).any(-1).any(-1).flatten(2).sum(-1)
            expected = 0 if part == "dense" else new_tokens
            assert (slots == expected).all(), (new_tokens, part, slots.tolist())
            assert not early.any(), (new_tokens, part)
            assert torch.equal(kv, written), (new_tokens, part)


@needs_cuda
def test_prefill_graphs_equal_eager(gpu_runner):
    """Graph prefill (padded to a token bucket, GEMMs sized for 64 SMs) against the eager step on the
    same inputs, for a batch with a cached prefix and a token handed over on the device."""
    r = gpu_runner
    r.kv_cache.kv.normal_()
    stream = torch.cuda.Stream()
    total = torch.cuda.get_device_properties(0).multi_processor_count
    [report] = r.capture_graphs({"p": (stream, min(64, total))}, {}, total_sms=total, prefill_tokens=256)
    assert report.buckets == [16, 32, 64, 128, 256]
    prev_ids = torch.tensor([5, 17], device="cuda")
    batch = PrefillInput([list(range(3, 40)), [0], list(range(50, 60))], [0, 30, 12],
                         [[0, 1, 2], [3, 4], [5, 6]], src=[-1, 1, -1])
    with torch.cuda.stream(stream):  # the logits are made on the side's stream: read them there
        eager = r.prefill(batch, stream=stream, prev_ids=prev_ids).float().clone()
        graph = r.prefill(batch, key="p", prev_ids=prev_ids).float().clone()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
    assert torch.equal(graph.argmax(-1), eager.argmax(-1))


@needs_cuda
def test_mixed_step_graphs_equal_the_reference(gpu_runner):
    """Prefill graphs captured with decode_rows_apart (chunked's): a mixed step's decode rows (first,
    over long prefixes) go through the split-KV decode kernel inside the graph; the logits equal the
    torch reference backend's on the same cache, and a pure prefill step replays the same graphs."""
    r = gpu_runner
    ref = ModelRunner(r.config, device="cuda", num_kv_blocks=r.num_kv_blocks, backend="torch",
                      max_model_len=r.max_model_len)
    ref.model.load_state_dict(r.model.state_dict())
    r.kv_cache.kv.normal_()
    ref.kv_cache.kv.copy_(r.kv_cache.kv)
    stream = torch.cuda.Stream()
    total = torch.cuda.get_device_properties(0).multi_processor_count
    r.capture_graphs({"m": (stream, None)}, {}, total_sms=total, prefill_tokens=256, decode_rows_apart=True)
    mixed = PrefillInput([[11], [12], [13], list(range(3, 60))], [200, 40, 170, 0],
                         [list(range(0, 13)), [20, 21, 22], list(range(23, 34)), [34, 35, 36, 37]])
    fresh = PrefillInput([list(range(5, 45))], [0], [[40, 41, 42]])
    for batch in (mixed, fresh):
        with torch.cuda.stream(stream):
            graph = r.prefill(batch, key="m").float().clone()
        torch.cuda.synchronize()
        expected = ref.prefill(batch).float()
        torch.testing.assert_close(graph, expected, rtol=5e-2, atol=5e-2)
        assert torch.equal(graph.argmax(-1), expected.argmax(-1))


@needs_cuda
def test_phase_fns_keep_their_inputs_alive(gpu_runner):
    """A profiler callable replays a graph that reads tensors made when it was built: freed, their
    memory would be handed to later allocations (here filled with huge token ids) and the replay
    would read garbage (an out-of-range embedding index stops the device)."""
    stream = torch.cuda.Stream()
    fns = [gpu_runner.prefill_fn(64, 16, "all", stream), gpu_runner.decode_fn(4, 40, "all", stream)]
    churn = [torch.full((1 << 16,), 2**40, dtype=torch.int64, device="cuda") for _ in range(64)]
    for fn in fns:
        fn(stream)
    torch.cuda.synchronize()
    del churn
