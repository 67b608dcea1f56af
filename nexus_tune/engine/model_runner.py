"""`ModelRunner`: the model, its paged KV cache and its CUDA graphs, behind two calls.

`prefill(batch, stream, key)` runs chunks of several sequences packed into one forward pass;
`decode(batch, key, stream)` runs one token per sequence. Both return logits for the last token of
each sequence, produced on the step's stream. With `key` (a split side the graphs were captured
for) a step replays the graph of the smallest bucket that holds it (prefill: tokens, decode:
sequences; a decode batch a larger bucket's when that graph ran quicker at capture), else it runs
eagerly. `sample(logits, params, steps, stream)` draws the next tokens.

Inputs are built on the host with numpy and reach the device in one pinned non-blocking copy
(nexus_tune/engine/step_inputs.py), so a step never waits for the GPU; a token still on the device (sampled
by the previous step, whose tokens the host has not seen yet) is gathered there from `prev_ids`.
The runner also implements the profiler's `PhaseRunner` protocol (nexus_tune/core/runner.py):
`prefill_fn` / `decode_fn` with part "all" | "attention" | "dense", captured as graphs on the
stream (and with GEMMs sized for the SMs) the profiler names, exactly as the engine runs them.

Thread use: a prefill thread and a decode thread may call one runner at once (on their own
streams); sequences own disjoint KV blocks, and each path has its own buffers and graphs.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch

from nexus_tune.engine.attention import AttentionMetadata, decode_attention, prefill_attention, resolve_backend, store_kv
from nexus_tune.engine.config import ModelConfig
from nexus_tune.engine.cuda_graphs import GraphCaptureReport, GraphSet, capture, capture_quickest
from nexus_tune.engine.kv_cache import KVCache, activation_bytes, num_blocks_for_device
from nexus_tune.engine.loader import load_model
from nexus_tune.engine.sampling import sample
from nexus_tune.engine.step_inputs import DecodeInput, DecodeRows, PrefillArrays, PrefillInput, Staging, prefill_arrays
from nexus_tune.engine.tokenizer import load_tokenizer
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.latency_model import PARTS
from nexus_tune.core.sequence import SamplingParams

log = logging.getLogger(__name__)

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token buckets of the prefill graphs up to `max_tokens`: padding wastes at most 1/8 above 1024
    tokens, where steps are compute-bound; below, fewer graphs (small steps are weight-bound)."""
    sizes = [16, 32, 64, 128, 256] + list(range(384, 1025, 128)) + list(range(1280, 2049, 256)) \
        + list(range(2560, 4097, 512)) + list(range(5120, 8193, 1024))
    return [b for b in sizes if b < max_tokens] + [max_tokens]


class ModelRunner:
    def __init__(self, model: str | ModelConfig = "tiny", device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, seed: int = 0, backend: str = "auto",
                 block_size: int = EngineConfig.block_size, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization,
                 max_num_seqs: int = EngineConfig.max_num_seqs, max_model_len: int | None = None,
                 max_num_batched_tokens: int = EngineConfig.mixed_token_budget):
        """`model`: a preset name (random weights under `seed`), a checkpoint folder, or a ModelConfig.

        The KV cache takes `num_kv_blocks` blocks, or on CUDA what fits in `gpu_memory_utilization` of
        the card after the weights and an activation reserve sized by `max_num_batched_tokens` and
        `max_num_seqs` (on a CPU, a fixed budget).
        """
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.backend = resolve_backend(backend, self.device)
        t0 = time.perf_counter()
        self.model = load_model(model, self.device, self.dtype, seed)
        self.model.set_backend(self.backend)
        self.config = self.model.config
        self.tokenizer = load_tokenizer(model, self.config)
        self.num_layers = self.config.num_hidden_layers
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if self.max_model_len > self.config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"{self.config.max_position_embeddings} positions")
        self.block_size = block_size
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        if num_kv_blocks is None:
            reserve = activation_bytes(self.config, max_num_batched_tokens, max_num_seqs, self.dtype)
            num_kv_blocks = num_blocks_for_device(self.config, block_size, self.dtype, self.device,
                                                  gpu_memory_utilization, reserve)
        self.kv_cache = KVCache(self.config, num_kv_blocks, block_size, self.device, self.dtype)
        log.info("loaded %s (%s, %s, backend %s) in %.1f s; KV cache %d blocks x %d tokens (%.2f GiB)",
                 self.config.name, self.device, self.dtype, self.backend, time.perf_counter() - t0,
                 num_kv_blocks, block_size, self.kv_cache.nbytes / 2**30)
        self.max_num_batched_tokens = max_num_batched_tokens
        self._tile_tokens = _tile_tokens(self.config, self.dtype) if self.backend == "triton" else None
        # Each path (prefill, decode) has its own staging, rows and graphs: two loops call it at once.
        self._prefill_staging = Staging(self.device)
        self._decode_staging = Staging(self.device)
        self._decode_rows = DecodeRows(max_num_seqs, self.max_blocks_per_seq, block_size,
                                       self.kv_cache.scratch_block, self.device)
        self._decode_logits = torch.empty(max_num_seqs, self.config.vocab_size, dtype=self.dtype, device=self.device)
        self._prefill_static: _PrefillBuffers | None = None
        self._graphs: dict[str, GraphSet] = {}
        self._last_stream: dict[str, torch.cuda.Stream | None] = {"prefill": None, "decode": None}

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_cache.capacity_tokens

    # -- the two steps ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, batch: PrefillInput, stream: torch.cuda.Stream | None = None, key: Hashable | None = None,
                prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's last chunk token, computed on `stream` (with `key`: that
        side's stream, by graph when a bucket holds the batch). Graph logits are a view of a shared
        buffer: consume them before the next prefill call."""
        graphs = self._graphs.get("prefill")
        bucket = None
        if key is not None and graphs is not None and key in graphs:
            stream = graphs.stream(key)
            bucket = graphs.bucket(key, sum(map(len, batch.token_ids)))
        with on_stream(stream):
            self._follow("prefill", stream)
            if bucket is not None:
                return self._prefill_replay(batch, key, bucket, prev_ids)
            arrays = prefill_arrays(batch, self.block_size, self.max_model_len, self._scratch_slot, self._tile_tokens,
                                    decode_rows_apart=True)
            ids, positions, meta, last = self._prefill_tensors(arrays, self._prefill_staging, prev_ids)
            return self._forward_last(ids, positions, meta, last)

    @torch.inference_mode()
    def decode(self, batch: DecodeInput, key: Hashable | None = None, stream: torch.cuda.Stream | None = None,
               prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of one step. With `key`, on that side's stream, by graph when a bucket fits.

        Graph logits are a view of a shared buffer: consume them before the next decode call.
        """
        n = len(batch.token_ids)
        graphs = self._graphs.get("decode")
        bucket = None
        if key is not None:
            if graphs is None or key not in graphs:
                raise KeyError(f"no decode graphs were captured for split side {key!r}")
            stream = graphs.stream(key)
            bucket = graphs.bucket(key, n)
        with on_stream(stream):
            self._follow("decode", stream)
            self._decode_rows.load(batch, bucket or n, self._decode_staging, prev_ids, self.max_model_len)
            if bucket is not None:
                graphs.replay(key, bucket)
                return self._decode_logits[:n]
            return self._decode_forward(self._decode_rows, n, None, max(batch.positions) + 1)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
               stream: torch.cuda.Stream | None = None) -> list[int]:
        """Next token of each row, drawn on `stream` (where the logits were made); waits for it."""
        with on_stream(stream):
            return sample(logits, params, steps).tolist()

    def _follow(self, path: str, stream: torch.cuda.Stream | None) -> None:
        """Order this step after the path's previous one when it ran on another side's stream: they
        share the path's buffers (and the next step's tokens may come from the previous one's)."""
        last = self._last_stream[path]
        if stream is not None and last is not None and last != stream:
            stream.wait_stream(last)
        self._last_stream[path] = stream

    @property
    def _scratch_slot(self) -> int:
        return self.kv_cache.scratch_block * self.block_size

    # -- forward passes (eager, or inside a graph) ------------------------------------------------

    def _prefill_tensors(self, a: PrefillArrays, staging: Staging, prev_ids: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device tensors of host arrays `a` (unpadded), the tokens from `prev_ids` filled in."""
        tiles = a.tiles if a.tiles is not None else np.zeros((0, 2), dtype=np.int32)
        rows, cu, lens, last, tables, tiles, dst, src, decode_rows = staging.upload(
            a.token_rows, a.cu_seqlens, a.seq_lens, a.last, a.tables, tiles, a.src_dst, a.src_idx,
            np.array([a.decode_rows], dtype=np.int32))
        _fill_from_device(rows[0], dst, src, prev_ids)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=rows[2], block_tables=tables, seq_lens=lens,
                                 cu_seqlens_q=cu, max_seq_len=a.max_seq_len, tiles=tiles,
                                 decode_rows=decode_rows if a.decode_rows else None)
        return rows[0], rows[1], meta, last

    def _forward_last(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[last], out=out)

    def _decode_forward(self, rows: DecodeRows, n: int, sms: int | None, max_seq_len: int,
                        logits: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step over rows [0, n) of `rows` (what every decode graph captures), into `logits`."""
        ids, positions, slots = rows.tokens[:, :n]
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=rows.block_tables[:n],
                                 seq_lens=(positions + 1).to(torch.int32), cu_seqlens_q=None,
                                 max_seq_len=max_seq_len, num_sms=sms)
        hidden = self.model(ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden, out=None if logits is None else logits[:n])

    # -- CUDA graphs ----------------------------------------------------------------------------

    def capture_graphs(self, prefill_sides: dict[Hashable, tuple[torch.cuda.Stream, int | None]],
                       decode_sides: dict[Hashable, tuple[torch.cuda.Stream, int | None]],
                       total_sms: int, prefill_tokens: int | None = None,
                       decode_buckets: Iterable[int] | None = None,
                       prefill_sizes: Iterable[int] | None = None,
                       decode_rows_apart: bool = False) -> list[GraphCaptureReport]:
        """Prefill graphs per (side, token bucket up to `prefill_tokens`, default max_num_batched_tokens;
        or exactly `prefill_sizes`) and decode graphs per (side, batch bucket up to max_num_seqs); each
        side maps to (its stream, its SMs or None for the whole GPU), which sizes the prefill GEMMs and
        the decode attention's splits (nexus_tune/engine/cuda_graphs.py says why not the decode GEMMs).
        `decode_rows_apart`: the prefill graphs attend a step's leading single-token rows (chunked's decode
        rows) with the split-KV decode kernel; its launch then rides in every prefill graph, so only
        the policy that mixes rows asks for it."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; on a CPU every step runs eagerly")
        reports = []
        if prefill_sides and self._tile_tokens is None:
            log.warning("prefill runs eagerly: the %s attention backend reads lengths on the host (not capturable)",
                        self.backend)
        elif prefill_sides:
            sizes = sorted(prefill_sizes or prefill_buckets(prefill_tokens or self.max_num_batched_tokens))
            self._prefill_static = _PrefillBuffers(self, sizes[-1], decode_rows_apart)
            self._graphs["prefill"] = GraphSet("prefill", self.device, total_sms, size_gemms=True)
            reports.append(self._graphs["prefill"].capture(self._prefill_static_forward, prefill_sides, sizes))
        if decode_sides:
            if decode_buckets is None:
                decode_buckets = [b for b in DECODE_BUCKETS if b < self.max_num_seqs] + [self.max_num_seqs]
            sizes = sorted({b for b in decode_buckets if 1 <= b <= self.max_num_seqs})
            if not sizes:
                raise ValueError(f"no batch bucket in 1..max_num_seqs ({self.max_num_seqs})")
            self._graphs["decode"] = GraphSet("decode", self.device, total_sms, size_gemms=False, quickest=True)
            reports.append(self._graphs["decode"].capture(
                lambda rows, sms: self._decode_forward(self._decode_rows, rows, sms, self.max_model_len,
                                                       self._decode_logits), decode_sides, sizes))
        return reports

    def graph_set(self, kind: str) -> GraphSet:
        """The captured graphs of `kind` ("prefill" or "decode"), for inspection."""
        if kind not in self._graphs:
            raise KeyError(f"no {kind} graphs were captured")
        return self._graphs[kind]

    def _prefill_static_forward(self, tokens: int, sms: int | None) -> None:
        """The prefill step every prefill graph of `tokens` captures: static buffers in, static logits out."""
        s = self._prefill_static
        seqs, tiles = s.shape_of(tokens)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=s.token_rows[2, :tokens], block_tables=s.tables[:seqs],
                                 seq_lens=s.seq_lens[:seqs], cu_seqlens_q=s.cu[:seqs + 1],
                                 max_seq_len=self.max_model_len, tiles=s.tiles[:tiles], num_sms=sms,
                                 decode_rows=s.decode_rows if s.decode_rows_apart else None)
        self._forward_last(s.token_rows[0, :tokens], s.token_rows[1, :tokens], meta, s.last[:seqs], s.logits[:seqs])

    def _prefill_replay(self, batch: PrefillInput, key: Hashable, bucket: int,
                        prev_ids: torch.Tensor | None) -> torch.Tensor:
        s = self._prefill_static
        seqs, tiles = s.shape_of(bucket)
        a = prefill_arrays(batch, self.block_size, self.max_model_len, self._scratch_slot, self._tile_tokens,
                           tokens=bucket, seqs=seqs, tile_capacity=tiles if self._tile_tokens else None,
                           decode_rows_apart=s.decode_rows_apart)
        s.load(a, self._prefill_staging, prev_ids)
        self._graphs["prefill"].replay(key, bucket)
        return s.logits[: a.num_seqs]

    # -- PhaseRunner (the profiler's view) --------------------------------------------------------

    def prefill_fn(self, tokens: int, kv_prefix: int, part: str = "all", stream: torch.cuda.Stream | None = None,
                   sms: int | None = None) -> Callable[[torch.cuda.Stream | None], None]:
        """One sequence's chunk of `tokens` new tokens over `kv_prefix` cached ones, random ids.

        On CUDA the step is captured as a graph on `stream`, GEMMs sized for `sms` (None: the whole
        GPU), and the callable replays it; on a CPU it runs eagerly."""
        _check_part(part)
        blocks = self._profile_blocks([kv_prefix + tokens])
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(self.config.vocab_size, (tokens,), generator=gen).tolist()
        with torch.inference_mode():
            arrays = prefill_arrays(PrefillInput([ids], [kv_prefix], blocks), self.block_size, self.max_model_len,
                                    self._scratch_slot, self._tile_tokens)
            input_ids, positions, meta, last = self._prefill_tensors(arrays, Staging(self.device), None)
            qkv = self._random_qkv(tokens)
        _synchronize(self.device)  # inputs are ready whatever stream the callable runs on

        @torch.inference_mode()
        def step() -> None:
            if part == "attention":
                self._attention_only(*qkv, meta)
            else:
                hidden = self.model(input_ids, positions, self.kv_cache, meta, run_attention=part == "all")
                self.model.compute_logits(hidden[last])
        return self._replayable(step, stream, sms)  # GEMMs sized as in the engine's prefill graphs

    def decode_fn(self, batch: int, kv_tokens: int, part: str = "all", stream: torch.cuda.Stream | None = None,
                  sms: int | None = None) -> Callable[[torch.cuda.Stream | None], None]:
        """A decode step of `batch` sequences holding `kv_tokens` KV tokens in total (spread evenly),
        captured and replayed as `prefill_fn`'s (`sms` sizes the attention's KV splits)."""
        _check_part(part)
        if batch < 1 or kv_tokens < batch:
            raise ValueError(f"decode_fn needs batch >= 1 and at least one KV token per sequence "
                             f"(got batch {batch}, kv_tokens {kv_tokens})")
        lens = [kv_tokens // batch + (i < kv_tokens % batch) for i in range(batch)]
        tables = self._profile_blocks(lens, from_end=True)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(self.config.vocab_size, (batch,), generator=gen).tolist()
        rows = DecodeRows(batch, max(map(len, tables)), self.block_size, self.kv_cache.scratch_block, self.device)
        logits = torch.empty(batch, self.config.vocab_size, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            rows.load(DecodeInput(ids, [n - 1 for n in lens], tables), batch, Staging(self.device), None,
                      self.max_model_len)
            qkv = self._random_qkv(batch)
            meta = AttentionMetadata(is_prefill=False, slot_mapping=rows.tokens[2], block_tables=rows.block_tables,
                                     seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
                                     cu_seqlens_q=None, max_seq_len=max(lens), num_sms=sms)
        _synchronize(self.device)

        @torch.inference_mode()
        def step() -> None:
            if part == "attention":
                self._attention_only(*qkv, meta)
            elif part == "all":
                self._decode_forward(rows, batch, sms, max(lens), logits)
            else:
                hidden = self.model(rows.tokens[0], rows.tokens[1], self.kv_cache, meta, run_attention=False)
                self.model.compute_logits(hidden, out=logits)
        # As the engine's decode graphs: unsized GEMMs on the quicker library (attention alone has none).
        return self._replayable(step, stream, None, quickest=part != "attention")

    def _replayable(self, step: Callable[[], None], stream: torch.cuda.Stream | None,
                    gemm_sms: int | None, quickest: bool = False) -> Callable[[torch.cuda.Stream | None], None]:
        """`step` as a graph on `stream`: GEMMs sized for `gemm_sms`, or (`quickest`) the quicker BLAS library."""
        if self.device.type != "cuda":
            return lambda _stream: step()
        stream = stream or torch.cuda.current_stream()
        if quickest:
            graph = capture_quickest(step, stream)[0]
        else:
            total = torch.cuda.get_device_properties(self.device).multi_processor_count
            graph = capture(step, stream, sms=gemm_sms, total_sms=total)

        def replay(replay_stream: torch.cuda.Stream | None) -> None:
            with on_stream(replay_stream):
                graph.replay()
        replay.inputs = step  # the graph reads the tensors `step` closes over: they must live as long as it
        return replay

    def _profile_blocks(self, lens: list[int], from_end: bool = False) -> list[list[int]]:
        """Consecutive block ids for profiling sequences (prefill from the front, decode from the back)."""
        counts = [-(-n // self.block_size) for n in lens]
        total = sum(counts)
        if total > self.num_kv_blocks or max(lens) > self.max_model_len:
            raise ValueError(f"profiling {len(lens)} sequences of up to {max(lens)} tokens needs {total} KV blocks "
                             f"and max_model_len >= {max(lens)}; this runner has {self.num_kv_blocks} blocks and "
                             f"max_model_len {self.max_model_len}")
        start = self.num_kv_blocks - total if from_end else 0
        bounds = np.cumsum([start, *counts]).tolist()
        return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]

    def _random_qkv(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        gen = torch.Generator(device=self.device).manual_seed(2)
        shapes = [(tokens, c.num_attention_heads, c.head_dim)] + [(tokens, c.num_key_value_heads, c.head_dim)] * 2
        return tuple(torch.randn(s, generator=gen, device=self.device, dtype=self.dtype) for s in shapes)

    def _attention_only(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Every layer's KV write and attention kernel, nothing else (the profiler's "attention" class)."""
        scale = self.config.head_dim ** -0.5
        for k_cache, v_cache in zip(self.kv_cache.k, self.kv_cache.v):
            store_kv(k, v, k_cache, v_cache, meta, self.backend)
            if meta.is_prefill:
                prefill_attention(q, k, v, k_cache, v_cache, meta, scale, self.backend)
            else:
                decode_attention(q, k_cache, v_cache, meta, scale, self.backend)


class _PrefillBuffers:
    """The static inputs and logits every prefill graph reads and writes (views of them per bucket)."""

    def __init__(self, runner: ModelRunner, tokens: int, decode_rows_apart: bool):
        dev = runner.device
        self.max_seqs, self.tile_tokens = runner.max_num_seqs, runner._tile_tokens
        self.decode_rows_apart = decode_rows_apart
        seqs, tiles = self.shape_of(tokens)
        self.token_rows = torch.zeros(3, tokens, dtype=torch.int64, device=dev)
        self.token_rows[2] = runner._scratch_slot  # the capture's warm-up run writes nowhere else
        self.cu = torch.zeros(seqs + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, device=dev)
        self.last = torch.zeros(seqs, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(seqs, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.tiles = torch.full((tiles, 2), -1, dtype=torch.int32, device=dev)
        self.decode_rows = torch.zeros(1, dtype=torch.int32, device=dev)
        self.logits = torch.empty(seqs, runner.config.vocab_size, dtype=runner.dtype, device=dev)

    def shape_of(self, tokens: int) -> tuple[int, int]:
        """(sequences, tile-map rows) of the graph of a `tokens` bucket."""
        from nexus_tune.engine.kernels.prefill_attention import max_tiles

        seqs = min(tokens, self.max_seqs)
        return seqs, max_tiles(tokens, seqs, self.tile_tokens)

    def load(self, a: PrefillArrays, staging: Staging, prev_ids: torch.Tensor | None) -> None:
        """Copy padded host arrays into the buffers (on the current stream)."""
        tiles = a.tiles if a.tiles is not None else np.zeros((0, 2), dtype=np.int32)
        rows, cu, lens, last, tables, tiles, dst, src, decode_rows = staging.upload(
            a.token_rows, a.cu_seqlens, a.seq_lens, a.last, a.tables, tiles, a.src_dst, a.src_idx,
            np.array([a.decode_rows], dtype=np.int32))
        tokens, seqs = rows.shape[1], lens.shape[0]
        self.token_rows[:, :tokens].copy_(rows)
        self.cu[: seqs + 1].copy_(cu)
        self.seq_lens[:seqs].copy_(lens)
        self.last[:seqs].copy_(last)
        self.tables[: tables.shape[0], : tables.shape[1]].copy_(tables)
        self.tiles[: tiles.shape[0]].copy_(tiles)
        self.decode_rows.copy_(decode_rows)
        _fill_from_device(self.token_rows[0], dst, src, prev_ids)


def _fill_from_device(ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, prev_ids: torch.Tensor | None) -> None:
    """ids[dst] = prev_ids[src]: the tokens the previous step sampled and the host has not seen."""
    if dst.numel():
        if prev_ids is None:
            raise ValueError("a token on the device was asked for, but no previous step's ids were given")
        ids.index_copy_(0, dst, prev_ids.index_select(0, src))


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the current CUDA device if there is one, else the CPU; CUDA devices get their index."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU; use device='cpu'")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Work inside runs on `stream`; with None (a CPU), where it would anyway."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tile_tokens(config: ModelConfig, dtype: torch.dtype) -> int:
    """Query tokens per program of the Triton prefill kernel: the tile map is built in these units."""
    from nexus_tune.engine.kernels.prefill_attention import default_config

    group = config.num_attention_heads // config.num_key_value_heads
    return default_config(config.head_dim, dtype).tile_tokens(group)


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
