"""The Triton kernels against float64 PyTorch references written here.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small. The interpreter miscomputes bf16 `tl.dot`, so bf16 attention runs on CUDA only
(fp16 covers the 16-bit attention path on the CPU); the elementwise kernels are checked in bf16
everywhere.

The paged caches are built to catch stray reads: block-table entries past a sequence point at a
NaN page, and the slots past a sequence's end in its last page are NaN too, so a kernel that
follows an entry it should not, or loads a position it should mask, returns NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from nexus_tune.engine.kernels import (DecodeConfig, PrefillConfig, apply_rope, decode_attention, default_config,  # noqa: E402
                            max_tiles, num_kv_splits, prefill_attention, rms_norm, store_kv, tile_map)
from nexus_tune.engine.kernels.silu_mul import silu_mul  # noqa: E402
from nexus_tune.engine.kernels.skinny_gemm import MAX_ROWS as SKINNY_MAX_ROWS  # noqa: E402
from nexus_tune.engine.kernels.skinny_gemm import SkinnyConfig, skinny_linear  # noqa: E402
from nexus_tune.engine.kernels.decode_attention import MAX_SPLITS  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's bf16 tl.dot is wrong; fp16 takes the same 16-bit path (tiles, casts) there.
ATTN_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter miscomputes bf16 tl.dot"))]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _poison_allocator(numel: int) -> None:
    """Leave NaN in freed memory of this size, so an output slot a kernel forgets to write shows."""
    torch.full((numel,), float("nan"), device=DEVICE)


def make_paged_kv(gen: torch.Generator, seq_lens: list[int], kv_heads: int, head_dim: int,
                  block_size: int, max_blocks: int, dtype: torch.dtype):
    """Random caches with shuffled pages; returns k_cache, v_cache, block_tables, seq_lens tensor."""
    used = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(used) + 5 + 1  # 5 pages of other sequences, the last page is the NaN page
    nan_page = num_blocks - 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    tables = torch.full((len(seq_lens), max_blocks), nan_page, dtype=torch.int32)
    pages = torch.randperm(num_blocks - 1, generator=gen)
    k_cache[nan_page] = v_cache[nan_page] = float("nan")
    taken = 0
    for b, (n, u) in enumerate(zip(seq_lens, used)):
        tables[b, :u] = pages[taken:taken + u]
        taken += u
        if n % block_size:
            last = tables[b, u - 1]
            k_cache[last, n % block_size:] = v_cache[last, n % block_size:] = float("nan")
    to = dict(device=DEVICE)
    return (k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to), tables.to(**to),
            torch.tensor(seq_lens, dtype=torch.int32, **to))


def ref_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor,
                  seq_len: int, scale: float) -> torch.Tensor:
    """float64 attention of q [n, Hq, D] (the sequence's last n positions) over its first seq_len
    cached positions, gathered page by page, with a causal mask."""
    n, q_heads, head_dim = q.shape
    if seq_len == 0:
        return torch.zeros(n, q_heads, head_dim, dtype=torch.float64)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(seq_len)
    pages = table_row.cpu().long()[pos // block_size]
    k = k_cache.cpu().double()[pages, pos % block_size].repeat_interleave(q_heads // kv_heads, dim=1)
    v = v_cache.cpu().double()[pages, pos % block_size].repeat_interleave(q_heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.cpu().double(), k) * scale
    q_pos = torch.arange(seq_len - n, seq_len)
    scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max error {err}"


# -- decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size,seq_lens,num_splits,config", [
    (8, 2, 32, 16, [1, 17, 600, 0, 130], None, None),  # auto splits (3 here), seq_len 0 -> zeros
    (8, 2, 32, 16, [1, 17, 600, 0, 130], 7, None),     # more splits than tiles: empty splits
    (14, 2, 64, 16, [5, 300], 4, None),                # group of 7 query heads (Qwen2.5-0.5B)
    (3, 3, 16, 4, [33, 64, 65], 2, None),              # no GQA, odd head count, 16 pages per tile
    (8, 2, 32, 16, [620, 3, 0, 20, 64, 1], 16, None),  # one long sequence: many splits; the rest one each
    (8, 2, 32, 16, [620, 3, 0, 130], None, DecodeConfig(block_n=32, num_stages=3, programs_per_sm=8)),
    (8, 2, 32, 16, [620, 3, 0, 20, 64, 1], 16, DecodeConfig(programs_per_sm=1)),  # one program per head
])
def test_decode_attention(q_heads, kv_heads, head_dim, block_size, seq_lens, num_splits, config, dtype):
    gen = _gen(1)
    max_blocks = 40 if block_size == 16 else 20
    k_cache, v_cache, tables, lens = make_paged_kv(gen, seq_lens, kv_heads, head_dim, block_size,
                                                   max_blocks, dtype)
    q = _randn(gen, len(seq_lens), q_heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    _poison_allocator(len(seq_lens) * q_heads * head_dim)
    out = decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits,
                           **({"config": config} if config else {}))
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(seq_lens):
        assert_close(out[b], ref_attention(q[b:b + 1], k_cache, v_cache, tables[b], n, scale)[0], dtype)


def test_decode_attention_tickets_serve_many_launches_and_end_zero():
    """One ticket buffer serves every layer of a step: each launch's last split merges and resets its
    counters, so a second launch on the same buffer (other inputs) is as right as the first."""
    gen = _gen(9)
    seq_lens = [620, 3, 0, 130, 64]  # many splits, one split, empty
    k_cache, v_cache, tables, lens = make_paged_kv(gen, seq_lens, 2, 32, 16, 40, torch.float32)
    tickets = torch.zeros(len(seq_lens) * 2 + 3, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        q = _randn(gen, len(seq_lens), 8, 32)
        out = decode_attention(q, k_cache, v_cache, tables, lens, 32 ** -0.5, num_splits=16, tickets=tickets,
                               config=DecodeConfig(programs_per_sm=1))
        for b, n in enumerate(seq_lens):
            assert_close(out[b], ref_attention(q[b:b + 1], k_cache, v_cache, tables[b], n, 32 ** -0.5)[0],
                         torch.float32)
        assert (tickets == 0).all()
    with pytest.raises(ValueError, match="tickets"):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, tickets=tickets[:4])


def test_decode_attention_attends_only_the_counted_rows_into_out():
    """With `num_rows` (a count on the device) and `out`, rows past the count are left as they were:
    the decode rows of a mixed step write their part of the prefill output and nothing else."""
    gen = _gen(8)
    seq_lens = [300, 5, 90, 40]
    k_cache, v_cache, tables, lens = make_paged_kv(gen, seq_lens, 2, 32, 16, 40, torch.float32)
    q = _randn(gen, 4, 8, 32)
    out = torch.full_like(q, 7.0)
    result = decode_attention(q, k_cache, v_cache, tables, lens, 32 ** -0.5, out=out,
                              num_rows=torch.tensor([2], dtype=torch.int32, device=DEVICE),
                              config=DecodeConfig(programs_per_sm=1))
    assert result is out
    for b in range(2):
        assert_close(out[b], ref_attention(q[b:b + 1], k_cache, v_cache, tables[b], seq_lens[b], 32 ** -0.5)[0],
                     torch.float32)
    assert (out[2:] == 7.0).all()
    with pytest.raises(ValueError, match="num_rows"):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, num_rows=torch.tensor([2], device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.1, out=out[:3])


def test_decode_split_bound_comes_from_shapes():
    assert num_kv_splits(64, 8, 2048, 132) == 8            # room for a 2048-token sequence in 256-token splits
    assert num_kv_splits(256, 8, 16384, 132) <= 5          # a big batch: the launch budget bounds the grid
    assert num_kv_splits(48, 8, 16384, 132) >= 16          # a long document among 47 others can be cut up
    assert num_kv_splits(1, 8, 32768, 132) == MAX_SPLITS   # capped
    assert num_kv_splits(1, 8, 64, 132) == 1               # too short to be worth splitting
    assert num_kv_splits(0, 8, 64, 132) == 1


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_decode_attention_replays_in_cuda_graph():
    gen = _gen(2)
    final_lens = [20, 700, 0, 1]
    k_cache, v_cache, tables, lens = make_paged_kv(gen, final_lens, 2, 64, 16, 48, torch.bfloat16)
    q = _randn(gen, 4, 8, 64, dtype=torch.bfloat16)
    lens.copy_(torch.tensor([1, 1, 0, 1], dtype=torch.int32))  # captured with short sequences
    decode_attention(q, k_cache, v_cache, tables, lens, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    lens.copy_(torch.tensor(final_lens, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    for b, n in enumerate(final_lens):
        ref = ref_attention(q[b:b + 1], k_cache, v_cache, tables[b], n, 0.125)[0]
        assert_close(out[b], ref, torch.bfloat16)


# -- prefill --------------------------------------------------------------------------------

def chunk_inputs(gen: torch.Generator, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 prefixes: list[int], q_lens: list[int], q_heads: int, config: PrefillConfig):
    """A prefill step over sequences whose prefix AND chunk sit in the caches (the reference reads them
    there): the chunk's K/V as views of one fused tensor (as the projection makes them), and copies of
    the caches with the chunk's slots poisoned with NaN, since the kernel must read a chunk's own K/V
    from k/v, not the cache. Returns q, k, v, the poisoned caches, cu_seqlens, the tile map (sized as the
    engine sizes it, so padding rows are always there: their programs must write nothing)."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    fused = torch.empty(sum(q_lens), 3, kv_heads, head_dim, dtype=k_cache.dtype, device=DEVICE)
    k, v = fused[:, 1], fused[:, 2]
    k_poisoned, v_poisoned = k_cache.clone(), v_cache.clone()
    t = 0
    for b, (p, n) in enumerate(zip(prefixes, q_lens)):
        pos = torch.arange(p, p + n)
        pages = tables[b].cpu().long()[pos // block_size].to(DEVICE)
        k[t:t + n], v[t:t + n] = k_cache[pages, pos % block_size], v_cache[pages, pos % block_size]
        k_poisoned[pages, pos % block_size] = v_poisoned[pages, pos % block_size] = float("nan")
        t += n
    q = _randn(gen, sum(q_lens), q_heads, head_dim, dtype=k_cache.dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(device=DEVICE, dtype=torch.int32)
    tile_tokens = config.tile_tokens(q_heads // kv_heads)
    tiles = tile_map(q_lens, prefixes, tile_tokens, capacity=max_tiles(sum(q_lens), len(q_lens), tile_tokens))
    assert (tiles[:, 0] < 0).any()
    tiles = torch.from_numpy(tiles).to(DEVICE)
    return q, k, v, k_poisoned, v_poisoned, cu, tiles


def check_prefill(out, q, cu, k_cache, v_cache, tables, prefixes, q_lens, scale, dtype) -> None:
    for b, (p, n) in enumerate(zip(prefixes, q_lens)):
        ref = ref_attention(q[cu[b]:cu[b + 1]], k_cache, v_cache, tables[b], p + n, scale)
        assert_close(out[cu[b]:cu[b + 1]], ref, dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size,prefixes,q_lens,config", [
    (4, 2, 32, 16, [0, 37, 13, 5], [20, 1, 70, 16], None),                  # default tiles, several query tiles
    (4, 2, 32, 16, [0, 37, 13, 5], [20, 1, 70, 16], PrefillConfig(16, 16, 4, 2)),  # many full tiles
    (2, 1, 16, 4, [100], [1], None),                                         # one token over a long prefix
    (6, 2, 64, 16, [0], [33], PrefillConfig(32, 64, 4, 2)),                  # no prefix, head_dim 64
    (4, 2, 32, 16, [64, 0], [64, 96], PrefillConfig(32, 16, 4, 2)),         # tiles aligned with the prefix
    (2, 2, 32, 16, [0, 30], [40, 25], None),                                 # MHA (group 1)
    (8, 2, 32, 16, [0, 50], [45, 30], None),                                 # group 4 (Llama-3.1-8B)
    (8, 1, 32, 16, [0, 21], [37, 19], None),                                 # group 8 (Qwen2.5-3B)
    (14, 2, 32, 16, [3, 0], [20, 9], None),                                  # group 7: a tile's last rows unused
    # Chunked mixed steps: prompt chunks and many 1-token decode rows over long prefixes.
    (8, 2, 32, 16, [0, 10, 90, 130, 77, 200, 64, 150, 33, 111], [40, 23] + [1] * 8, None),
    (16, 2, 32, 16, [41, 0, 180, 95, 160, 64, 129, 17], [30, 12] + [1] * 6, None),
    (4, 4, 32, 16, [0, 70, 140, 31], [33, 1, 1, 1], None),                   # MHA with decode rows
])
def test_prefill_attention(q_heads, kv_heads, head_dim, block_size, prefixes, q_lens, config, dtype):
    gen = _gen(3)
    cfg = config or default_config(head_dim, dtype)
    k_cache, v_cache, tables, lens = make_paged_kv(gen, [p + n for p, n in zip(prefixes, q_lens)], kv_heads,
                                                   head_dim, block_size, 40, dtype)
    q, k, v, k_pois, v_pois, cu, tiles = chunk_inputs(gen, k_cache, v_cache, tables, prefixes, q_lens, q_heads, cfg)
    scale = head_dim ** -0.5
    _poison_allocator(q.numel())
    out = prefill_attention(q, k, v, k_pois, v_pois, cu, lens, tables, tiles, scale, config=config)
    assert out.shape == q.shape and out.dtype == dtype
    check_prefill(out, q, cu, k_cache, v_cache, tables, prefixes, q_lens, scale, dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,prefixes,q_lens", [
    (8, 2, [300, 90, 620, 0, 37], [1, 1, 1, 40, 23]),  # decode rows first (as the engine packs them), then chunks
    (8, 1, [130, 17], [1, 1]),                          # decode rows only (group 8, Qwen2.5-3B)
    (4, 2, [70, 0, 5], [1, 33, 1]),                     # a single-token chunk behind a prompt stays in the tile map
    (8, 2, [100], [1]),                                 # one row (Triton makes a batch of 1 a constant)
])
def test_mixed_step_sends_its_decode_rows_to_the_split_kv_kernel(q_heads, kv_heads, prefixes, q_lens, dtype):
    """AttentionMetadata.decode_rows on Triton: the leading single-token rows of a chunked mixed step
    are attended by the decode kernel (their KV split across programs), the rest by the tile map;
    together they equal the reference."""
    from nexus_tune.engine.attention import AttentionMetadata
    from nexus_tune.engine.attention import prefill_attention as attend_prefill

    gen = _gen(9)
    cfg = default_config(32, dtype)
    k_cache, v_cache, tables, lens = make_paged_kv(gen, [p + n for p, n in zip(prefixes, q_lens)], kv_heads,
                                                   32, 16, 40, dtype)
    q, k, v, k_pois, v_pois, cu, _ = chunk_inputs(gen, k_cache, v_cache, tables, prefixes, q_lens, q_heads, cfg)
    singles = next((b for b, n in enumerate(q_lens) if n != 1), len(q_lens))
    for b in range(singles):  # a decode row's own K/V are read from the cache, where store_kv put them
        page, slot = tables[b, prefixes[b] // 16], prefixes[b] % 16
        k_pois[page, slot], v_pois[page, slot] = k_cache[page, slot], v_cache[page, slot]
    tile_tokens = cfg.tile_tokens(q_heads // kv_heads)
    tiles = tile_map([0 if b < singles else n for b, n in enumerate(q_lens)], prefixes, tile_tokens,
                     capacity=max_tiles(sum(q_lens), len(q_lens), tile_tokens))
    meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.zeros(0), block_tables=tables, seq_lens=lens,
                             cu_seqlens_q=cu, max_seq_len=max(lens.tolist()), tiles=torch.from_numpy(tiles).to(DEVICE),
                             decode_rows=torch.tensor([singles], dtype=torch.int32, device=DEVICE))
    _poison_allocator(q.numel())
    out = attend_prefill(q, k, v, k_pois, v_pois, meta, 32 ** -0.5, "triton")
    check_prefill(out, q, cu, k_cache, v_cache, tables, prefixes, q_lens, 32 ** -0.5, dtype)


def test_tile_map_covers_every_query_once_heaviest_first():
    tiles = tile_map([130, 1, 64], [0, 500, 10], 64, capacity=8)
    real = tiles[tiles[:, 0] >= 0]
    assert sorted(map(tuple, real.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert (tiles[len(real):] == -1).all()
    assert tuple(real[0]) == (1, 0)  # 500 cached tokens: the most KV to read
    with pytest.raises(ValueError, match="do not fit"):
        tile_map([130], [0], 64, capacity=2)


def test_tile_tokens_pack_a_kv_heads_query_heads():
    assert [PrefillConfig(64, 64, 4, 3).tile_tokens(g) for g in (1, 2, 4, 7, 8)] == [64, 32, 16, 9, 8]
    with pytest.raises(ValueError, match="cannot hold"):
        PrefillConfig(16, 16, 4, 2).tile_tokens(32)


@pytest.mark.skipif(not CUDA, reason="the Llama-3.1-8B shape is too big for the interpreter")
def test_prefill_attention_llama_shape():
    gen = _gen(4)
    prefixes, q_lens = [0, 500], [300, 200]
    k_cache, v_cache, tables, lens = make_paged_kv(gen, [300, 700], 8, 128, 16, 48, torch.bfloat16)
    q, k, v, k_pois, v_pois, cu, tiles = chunk_inputs(gen, k_cache, v_cache, tables, prefixes, q_lens, 32,
                                                      default_config(128, torch.bfloat16))
    out = prefill_attention(q, k, v, k_pois, v_pois, cu, lens, tables, tiles, 128 ** -0.5)
    check_prefill(out, q, cu, k_cache, v_cache, tables, prefixes, q_lens, 128 ** -0.5, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_prefill_attention_replays_in_cuda_graph_with_another_batch():
    """Captured for one step, replayed after the same tensors were rewritten for another step over
    the same sequences (other prefix/chunk cuts, the same token count): the grid comes from shapes."""
    gen = _gen(7)
    cfg = default_config(64, torch.bfloat16)
    k_cache, v_cache, tables, lens = make_paged_kv(gen, [50, 70], 2, 64, 16, 8, torch.bfloat16)
    a = chunk_inputs(gen, k_cache, v_cache, tables, [0, 40], [50, 30], 8, cfg)
    b = chunk_inputs(gen, k_cache, v_cache, tables, [20, 20], [30, 50], 8, cfg)
    q, k, v, k_pois, v_pois, cu, tiles = a
    prefill_attention(q, k, v, k_pois, v_pois, cu, lens, tables, tiles, 0.125)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prefill_attention(q, k, v, k_pois, v_pois, cu, lens, tables, tiles, 0.125)
    for dst, src in zip(a, b):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    check_prefill(out, b[0], b[5], k_cache, v_cache, tables, [20, 20], [30, 50], 0.125, torch.bfloat16)


def test_attention_rejects_bad_shapes():
    gen = _gen(5)
    k_cache, v_cache, tables, lens = make_paged_kv(gen, [4], 2, 32, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(_randn(gen, 1, 3, 32), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(_randn(gen, 1, 4, 24), k_cache[..., :24], v_cache[..., :24], tables, lens, 1.0)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE)
    kv = _randn(gen, 8, 2, 32)
    tiles = torch.from_numpy(tile_map([4, 4], [0, 0], 32)).to(DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        prefill_attention(_randn(gen, 8, 4, 32), kv, kv, k_cache, v_cache, cu, lens, tables, tiles, 1.0)
    with pytest.raises(ValueError, match="equal strides"):
        prefill_attention(_randn(gen, 4, 4, 32), kv[:4], kv[:3], k_cache, v_cache, cu[:2], lens, tables, tiles, 1.0)


# -- KV write -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype):
    gen = _gen(6)
    tokens, kv_heads, head_dim, block_size, num_blocks = 9, 3, 16, 4, 6
    # k and v as views of a fused QKV output: rows are not contiguous.
    qkv = _randn(gen, tokens, (2 + 2 * kv_heads) * head_dim, dtype=dtype)
    k = qkv[:, 2 * head_dim:(2 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (2 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 5]] = -1  # padding rows of a graph batch
    slot_mapping = slots.to(device=DEVICE, dtype=torch.int64)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, -7.0)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    expect_k, expect_v = torch.full_like(k_cache, 7.0).view(-1, kv_heads, head_dim), \
        torch.full_like(v_cache, -7.0).view(-1, kv_heads, head_dim)
    keep = slots >= 0
    expect_k[slots[keep]] = k[keep.to(DEVICE)]
    expect_v[slots[keep]] = v[keep.to(DEVICE)]
    assert torch.equal(k_cache.view_as(expect_k), expect_k)
    assert torch.equal(v_cache.view_as(expect_v), expect_v)


# -- RMSNorm --------------------------------------------------------------------------------

def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.cpu().double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.cpu().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    gen = _gen(7)
    x = _randn(gen, 2, 5, 96, dtype=dtype)  # hidden size not a power of two, 3-D input
    weight = _randn(gen, 96, dtype=dtype)
    residual = _randn(gen, 2, 5, 96, dtype=dtype) if with_residual else None
    _poison_allocator(x.numel())
    out, residual_out = rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        # The model-dtype sum, as HF computes it: exact on a GPU; the interpreter truncates
        # fp32 -> bf16 instead of rounding, which can cost one bf16 ulp.
        ulp = 0.0 if CUDA or dtype == torch.float32 else 2.0 ** -7
        torch.testing.assert_close(residual_out, x + residual, rtol=ulp, atol=0.0)
    else:
        assert residual_out is x
    ref = ref_rms_norm(residual_out, weight, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == x.shape and out.dtype == dtype
    assert (out.cpu().double() - ref).abs().max().item() <= tol * ref.abs().max().item()


# -- RoPE -----------------------------------------------------------------------------------

def cos_sin_cache(max_pos: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def ref_rope(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """HF Llama/Qwen2 `x * cos + rotate_half(x) * sin` in float64."""
    half = x.shape[-1] // 2
    cos, sin = cache[positions.cpu()].double().chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]
    x = x.cpu().double()
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope(dtype):
    gen = _gen(8)
    tokens, q_heads, kv_heads, head_dim = 7, 6, 2, 32
    qkv = _randn(gen, tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    before = qkv.clone()
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 500, 77, 3, 1023], device=DEVICE)
    cache = cos_sin_cache(1024, head_dim)
    ref_q, ref_k = ref_rope(q, positions, cache), ref_rope(k, positions, cache)
    apply_rope(q, k, positions, cache.to(device=DEVICE, dtype=torch.float32))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (q.cpu().double() - ref_q).abs().max().item() <= tol * ref_q.abs().max().item()
    assert (k.cpu().double() - ref_k).abs().max().item() <= tol * ref_k.abs().max().item()
    v_start = (q_heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_writes_rotated_k_and_v_into_the_caches(dtype):
    """The fused KV write: the caches hold what a rotation followed by store_kv would put there, the
    padding row (slot -1) writes nothing, and q and k are rotated in place as without the caches."""
    gen = _gen(10)
    tokens, q_heads, kv_heads, head_dim, page = 5, 8, 2, 32, 4
    qkv = _randn(gen, tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(tokens, -1, head_dim) for x in (q, k, v))
    positions = torch.tensor([3, 0, 17, 9, 1], device=DEVICE)
    slots = torch.tensor([13, 2, -1, 7, 0], device=DEVICE)
    cos_sin = cos_sin_cache(32, head_dim)
    ref_q, ref_k, v_before = ref_rope(q, positions, cos_sin), ref_rope(k, positions, cos_sin), v.clone()
    k_cache = torch.full((4, page, kv_heads, head_dim), 5.0, device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, 5.0)
    apply_rope(q, k, positions, cos_sin.to(device=DEVICE, dtype=torch.float32), v=v, k_cache=k_cache,
               v_cache=v_cache, slot_mapping=slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (q.cpu().double() - ref_q).abs().max().item() <= tol * ref_q.abs().max().item()
    assert (k.cpu().double() - ref_k).abs().max().item() <= tol * ref_k.abs().max().item()
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[t]) and torch.equal(flat_v[slot], v_before[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(flat_k.shape[0]) if s not in written]
    assert (flat_k[untouched] == 5.0).all() and (flat_v[untouched] == 5.0).all()
    with pytest.raises(ValueError, match="slot_mapping"):
        apply_rope(q, k, positions, cos_sin.to(device=DEVICE, dtype=torch.float32), v=v, k_cache=k_cache,
                   v_cache=v_cache, slot_mapping=slots[:3])


# The LM head of a few rows: odd M, N and K (masked tails), against a float64 product.
SKINNY_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter miscomputes bf16 tl.dot"))]


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("m,n,k,config", [
    (1, 40, 96, SkinnyConfig(block_n=16, block_k=32)),    # K a multiple of the tile: unmasked loads
    (5, 48, 130, SkinnyConfig(block_n=32, block_k=32)),   # K tail masked
    (64, 70, 64, SkinnyConfig(block_n=32, block_k=64)),   # a full row block, N tail
])
def test_skinny_linear(m, n, k, config, dtype):
    gen = _gen(m * n + k)
    x = _randn(gen, m, k, dtype=dtype)
    w = _randn(gen, n, k, dtype=dtype) * k ** -0.5
    _poison_allocator(m * n)
    out = skinny_linear(x, w, cfg=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, (x.double() @ w.double().t()).cpu(), dtype)
    into = torch.full((m + 3, n), float("nan"), device=DEVICE, dtype=dtype)
    skinny_linear(x, w, out=into[:m], cfg=config)
    assert torch.equal(into[:m], out) and into[m:].isnan().all()  # writes its rows of `out`, no others


def test_skinny_linear_rejects_bad_shapes():
    w = torch.zeros(16, 32)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(SKINNY_MAX_ROWS + 1, 32), w)
    with pytest.raises(ValueError, match="columns"):
        skinny_linear(torch.zeros(2, 31), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 8), (3, 1500), (0, 16)])
def test_silu_mul(rows, inter, dtype):
    gate_up = _randn(_gen(rows + inter), rows, 2 * inter, dtype=dtype) * 3
    out = silu_mul(gate_up)
    # PyTorch's two kernels in the same dtype; bf16: within the two roundings (2 ulps)
    ref = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert out.shape == (rows, inter) and out.dtype == dtype
    assert torch.allclose(out.float(), ref.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_silu_mul_rejects_an_odd_width():
    with pytest.raises(ValueError, match="2I"):
        silu_mul(torch.zeros(2, 7))
