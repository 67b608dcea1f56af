"""`ModelRunner`: the model, its paged KV cache and its decode CUDA graphs, behind two calls.

`prefill(batch, stream)` runs chunks of several sequences packed into one forward pass;
`decode(batch, key)` runs one token per sequence, replaying the CUDA graph captured for that
SM split (`key`) and the smallest batch bucket that holds the batch, or eagerly when there is
none. Both return logits for the last token of each sequence, produced on the step's stream;
`sample(logits, params, steps, stream)` draws the next tokens on that same stream.

Inputs are built on the host with numpy and copied once per tensor from pinned memory
(non-blocking), so a step never waits for the GPU. The runner also implements the profiler's
`PhaseRunner` protocol (nexus_tune/runner.py): `prefill_fn` / `decode_fn` with part
"all" | "attention" | "dense", inputs prepared before the returned callable runs.

Thread use: a prefill thread and a decode thread may call one runner at once (on their own
streams); sequences own disjoint KV blocks, and only the decode side touches the graphs.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, decode_attention, prefill_attention, resolve_backend, store_kv
from engine.config import ModelConfig
from engine.kv_cache import KVCache, activation_bytes, num_blocks_for_device
from engine.loader import load_model
from engine.sampling import sample
from engine.tokenizer import load_tokenizer
from nexus_tune.runner import PARTS
from nexus_tune.sequence import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class PrefillBatch:
    """One chunk per sequence: its new tokens, the tokens already in its KV, its block table."""

    token_ids: list[list[int]]
    prefix_lens: list[int]
    block_tables: list[list[int]]  # covering prefix + chunk


@dataclass
class DecodeBatch:
    """One new token per sequence, at `position` (= tokens already in its KV cache)."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]  # covering position + 1 tokens


@dataclass(frozen=True)
class GraphCaptureReport:
    keys: list[Hashable]
    buckets: list[int]
    num_graphs: int
    seconds: float
    memory_bytes: int  # device memory the graphs and their static buffers took

    def __str__(self) -> str:
        return (f"captured {self.num_graphs} decode CUDA graphs ({len(self.keys)} splits x buckets "
                f"{self.buckets}) in {self.seconds:.1f} s using {self.memory_bytes / 2**20:.0f} MiB")


class _DecodeBuffers:
    """The static inputs and logits every decode graph reads and writes (shared by all of them).

    Rows beyond a batch are padding: token 0 at position 0, writing and reading the scratch block.
    """

    def __init__(self, rows: int, max_blocks: int, vocab: int, kv: KVCache, device: torch.device, dtype: torch.dtype):
        scratch_slot = kv.scratch_block * kv.block_size
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.full((rows, max_blocks), kv.scratch_block, dtype=torch.int32, device=device)
        self.logits = torch.empty(rows, vocab, dtype=dtype, device=device)


class ModelRunner:
    def __init__(self, model: str | ModelConfig = "tiny", device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, seed: int = 0, backend: str = "auto", block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 8192):
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
        self._static: _DecodeBuffers | None = None
        self._graphs: dict[tuple[Hashable, int], torch.cuda.CUDAGraph] = {}
        self._graph_streams: dict[Hashable, torch.cuda.Stream] = {}
        self._graph_buckets: dict[Hashable, list[int]] = {}
        self._graph_pool = None
        self._last_graph_stream: torch.cuda.Stream | None = None

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_cache.capacity_tokens

    # -- the two steps ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's last chunk token, computed on `stream`."""
        with _on(stream):
            input_ids, positions, meta, last = self._prepare_prefill(batch)
            hidden = self.model(input_ids, positions, self.kv_cache, meta)
            return self.model.compute_logits(hidden[last])

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, key: Hashable | None = None,
               stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Logits [B, vocab] of one step. With `key`, on that split's stream, by graph when a bucket fits.

        A graph's logits are a view of a shared buffer: consume them before the next decode call.
        """
        if key is not None:
            if key not in self._graph_streams:
                raise KeyError(f"no decode graphs were captured for split {key!r}")
            stream = self._graph_streams[key]
            bucket = next((b for b in self._graph_buckets[key] if b >= len(batch.token_ids)), None)
            if bucket is not None:
                return self._replay(batch, key, bucket)
        with _on(stream):
            input_ids, positions, meta = self._prepare_decode(batch)
            hidden = self.model(input_ids, positions, self.kv_cache, meta)
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
               stream: torch.cuda.Stream | None = None) -> list[int]:
        """Next token of each row, drawn on `stream` (where the logits were made); waits for it."""
        with _on(stream):
            return sample(logits, params, steps).tolist()

    # -- inputs ---------------------------------------------------------------------------------

    def _host(self, array: np.ndarray) -> torch.Tensor:
        """`array` as a host tensor, pinned on CUDA so that copies from it do not block the host."""
        t = torch.from_numpy(array)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return self._host(array).to(self.device, non_blocking=True)

    def _check_lengths(self, seq_lens: np.ndarray, block_tables: list[list[int]]) -> None:
        longest = int(seq_lens.max())
        if longest > self.max_model_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_model_len {self.max_model_len}")
        for n, table in zip(seq_lens.tolist(), block_tables):
            if len(table) * self.block_size < n:
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {n} tokens")

    def _prepare_prefill(self, batch: PrefillBatch
                         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        q_lens = np.array([len(t) for t in batch.token_ids], dtype=np.int64)
        if q_lens.size == 0 or q_lens.min() < 1:
            raise ValueError("a prefill batch needs at least one sequence and one token per sequence")
        prefix = np.array(batch.prefix_lens, dtype=np.int64)
        seq_lens = prefix + q_lens
        self._check_lengths(seq_lens, batch.block_tables)
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(q_lens)
        seq_idx = np.repeat(np.arange(len(q_lens)), q_lens)
        positions = np.arange(cu[-1]) - cu[seq_idx] + prefix[seq_idx]
        tables = _block_table_array(batch.block_tables, len(q_lens), fill=0)
        bs = self.block_size
        slots = tables[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        input_ids = np.fromiter(itertools.chain.from_iterable(batch.token_ids), dtype=np.int64, count=int(cu[-1]))
        meta = AttentionMetadata(
            is_prefill=True, slot_mapping=self._to_device(slots), block_tables=self._to_device(tables),
            seq_lens=self._to_device(seq_lens.astype(np.int32)), cu_seqlens_q=self._to_device(cu),
            max_q_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()))
        last = (cu[1:] - 1).astype(np.int64)
        return self._to_device(input_ids), self._to_device(positions), meta, self._to_device(last)

    def _decode_arrays(self, batch: DecodeBatch, rows: int) -> dict[str, np.ndarray]:
        """Host inputs of a decode step padded to `rows` (padding reads and writes the scratch block)."""
        n = len(batch.token_ids)
        if n == 0:
            raise ValueError("a decode batch needs at least one sequence")
        positions = np.zeros(rows, dtype=np.int64)
        positions[:n] = batch.positions
        seq_lens = np.ones(rows, dtype=np.int32)
        seq_lens[:n] = positions[:n] + 1
        self._check_lengths(seq_lens[:n], batch.block_tables)
        scratch = self.kv_cache.scratch_block
        tables = _block_table_array(batch.block_tables, rows, fill=scratch)
        slots = np.full(rows, scratch * self.block_size, dtype=np.int64)
        slots[:n] = (tables[np.arange(n), positions[:n] // self.block_size].astype(np.int64) * self.block_size
                     + positions[:n] % self.block_size)
        input_ids = np.zeros(rows, dtype=np.int64)
        input_ids[:n] = batch.token_ids
        return {"input_ids": input_ids, "positions": positions, "seq_lens": seq_lens, "slot_mapping": slots,
                "block_tables": tables}

    def _prepare_decode(self, batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        a = self._decode_arrays(batch, len(batch.token_ids))
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=self._to_device(a["slot_mapping"]),
            block_tables=self._to_device(a["block_tables"]), seq_lens=self._to_device(a["seq_lens"]),
            cu_seqlens_q=None, max_q_len=1, max_seq_len=int(a["seq_lens"].max()))
        return self._to_device(a["input_ids"]), self._to_device(a["positions"]), meta

    # -- decode CUDA graphs ---------------------------------------------------------------------

    def capture_decode_graphs(self, streams: Mapping[Hashable, torch.cuda.Stream],
                              buckets: Iterable[int] | None = None) -> GraphCaptureReport:
        """One graph per (split key, batch bucket), each captured on that split's stream, one shared pool.

        A graph keeps the SMs of the stream it was captured on (docs: shared/GPU-FACTS.md), so every
        split the decode loop may run under needs its own set. Buckets default to DEFAULT_BUCKETS up
        to max_num_seqs, plus max_num_seqs itself.
        """
        if self.device.type != "cuda":
            raise RuntimeError("decode CUDA graphs need a CUDA device; on a CPU decode runs eagerly")
        if buckets is None:
            buckets = [b for b in DEFAULT_BUCKETS if b < self.max_num_seqs] + [self.max_num_seqs]
        sizes = sorted({b for b in buckets if 1 <= b <= self.max_num_seqs})
        if not sizes:
            raise ValueError(f"no batch bucket in 1..max_num_seqs ({self.max_num_seqs})")
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        self._ensure_static()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            for key, stream in streams.items():
                for size in reversed(sizes):  # largest first: the smaller graphs reuse its pool memory
                    self._graphs[key, size] = self._capture(lambda size=size: self._static_decode(size), stream,
                                                            self._graph_pool)
                self._graph_streams[key] = stream
                self._graph_buckets[key] = sizes
        torch.cuda.synchronize(self.device)
        report = GraphCaptureReport(list(streams), sizes, len(streams) * len(sizes), time.perf_counter() - t0,
                                    free_before - torch.cuda.mem_get_info(self.device)[0])
        log.info("%s", report)
        return report

    @staticmethod
    def _capture(step: Callable[[], object], stream: torch.cuda.Stream, pool) -> torch.cuda.CUDAGraph:
        """Run `step` once on `stream` (kernel selection, JIT, lazy init happen outside capture), then capture it."""
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread (a prefill loop) may allocate while this one captures.
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            step()
        return graph

    def _ensure_static(self) -> None:
        if self._static is None:
            self._static = _DecodeBuffers(self.max_num_seqs, self.max_blocks_per_seq, self.config.vocab_size,
                                          self.kv_cache, self.device, self.dtype)

    def _load_static(self, batch: DecodeBatch, rows: int) -> None:
        """Copy a batch, padded to `rows`, into the static buffers (on the current stream)."""
        s, a = self._static, self._decode_arrays(batch, rows)
        for name in ("input_ids", "positions", "seq_lens", "slot_mapping"):
            getattr(s, name)[:rows].copy_(self._host(a[name]), non_blocking=True)
        width = a["block_tables"].shape[1]  # later columns are never read: seq_lens bound every row
        s.block_tables[:rows, :width].copy_(self._host(a["block_tables"]), non_blocking=True)

    def _static_decode(self, rows: int) -> None:
        """The decode step every graph captures: static buffers in, static logits out."""
        s = self._static
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=s.slot_mapping[:rows], block_tables=s.block_tables[:rows],
            seq_lens=s.seq_lens[:rows], cu_seqlens_q=None, max_q_len=1, max_seq_len=self.max_model_len)
        hidden = self.model(s.input_ids[:rows], s.positions[:rows], self.kv_cache, meta)
        self.model.compute_logits(hidden, out=s.logits[:rows])

    def _replay(self, batch: DecodeBatch, key: Hashable, bucket: int) -> torch.Tensor:
        stream = self._graph_streams[key]
        with torch.cuda.stream(stream):
            # The previous step may have run on another split's stream and still read the buffers.
            if self._last_graph_stream is not None and self._last_graph_stream != stream:
                stream.wait_stream(self._last_graph_stream)
            self._load_static(batch, bucket)
            self._graphs[key, bucket].replay()
        self._last_graph_stream = stream
        return self._static.logits[: len(batch.token_ids)]

    # -- PhaseRunner (the profiler's view) --------------------------------------------------------

    def prefill_fn(self, tokens: int, kv_prefix: int, part: str = "all") -> Callable[[torch.cuda.Stream | None], None]:
        """One sequence's chunk of `tokens` new tokens over `kv_prefix` cached ones, random ids."""
        _check_part(part)
        blocks = self._profile_blocks([kv_prefix + tokens])
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(self.config.vocab_size, (tokens,), generator=gen).tolist()
        with torch.inference_mode():
            input_ids, positions, meta, last = self._prepare_prefill(PrefillBatch([ids], [kv_prefix], blocks))
            qkv = self._random_qkv(tokens)
        _synchronize(self.device)  # inputs are ready whatever stream the callable runs on

        @torch.inference_mode()
        def run(stream: torch.cuda.Stream | None) -> None:
            with _on(stream):
                if part == "attention":
                    self._attention_only(*qkv, meta)
                else:
                    hidden = self.model(input_ids, positions, self.kv_cache, meta, run_attention=part == "all")
                    self.model.compute_logits(hidden[last])
        return run

    def decode_fn(self, batch: int, kv_tokens: int, part: str = "all",
                  stream: torch.cuda.Stream | None = None) -> Callable[[torch.cuda.Stream | None], None]:
        """A decode step of `batch` sequences holding `kv_tokens` KV tokens in total (spread evenly).

        On CUDA the step is captured as a graph on `stream` (its SMs stay with the graph) and the
        callable replays it; on a CPU it runs eagerly.
        """
        _check_part(part)
        if batch < 1 or kv_tokens < batch:
            raise ValueError(f"decode_fn needs batch >= 1 and at least one KV token per sequence "
                             f"(got batch {batch}, kv_tokens {kv_tokens})")
        lens = [kv_tokens // batch + (i < kv_tokens % batch) for i in range(batch)]
        tables = self._profile_blocks(lens, from_end=True)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(self.config.vocab_size, (batch,), generator=gen).tolist()
        with torch.inference_mode():
            input_ids, positions, meta = self._prepare_decode(DecodeBatch(ids, [n - 1 for n in lens], tables))
            qkv = self._random_qkv(batch)

        @torch.inference_mode()
        def step() -> None:
            if part == "attention":
                self._attention_only(*qkv, meta)
            else:
                hidden = self.model(input_ids, positions, self.kv_cache, meta, run_attention=part == "all")
                self.model.compute_logits(hidden)

        if self.device.type != "cuda":
            return lambda _stream: step()
        graph = self._capture(step, stream or torch.cuda.current_stream(), pool=None)

        def replay(replay_stream: torch.cuda.Stream | None) -> None:
            with _on(replay_stream):
                graph.replay()
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
        attend = prefill_attention if meta.is_prefill else decode_attention
        scale = self.config.head_dim ** -0.5
        for k_cache, v_cache in zip(self.kv_cache.k, self.kv_cache.v):
            store_kv(k, v, k_cache, v_cache, meta, self.backend)
            attend(q, k_cache, v_cache, meta, scale, self.backend)


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


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def _block_table_array(tables: list[list[int]], rows: int, fill: int) -> np.ndarray:
    """Ragged block tables as one [rows, widest] int32 array; unused entries hold `fill` (never read)."""
    out = np.full((rows, max(1, max(map(len, tables), default=1))), fill, dtype=np.int32)
    for i, table in enumerate(tables):
        out[i, : len(table)] = table
    return out
