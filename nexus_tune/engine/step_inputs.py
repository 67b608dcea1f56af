"""What a step's kernels read, built on the host with numpy and sent to the device in one copy.

- `PrefillInput` / `DecodeInput`: a step as the model runner takes it (tokens, positions, block
  tables). A token may still be on the device: `src[i] >= 0` says that row's token is entry
  `src[i]` of the previous step's sampled ids (the engine schedules step n+1 while step n runs).
- `Staging`: numpy arrays -> one pinned host buffer -> one non-blocking copy -> device views.
  Two host buffers take turns, so the host fills one while the copy from the other may still be
  queued behind the running step.
- `prefill_arrays`: the packed prefill inputs, padded to a CUDA graph's shape when asked.
- `DecodeRows`: the decode batch as the decode graphs read it, kept on the device across steps.
  Each step sends positions and slots (a few bytes a row) and only what changed in the block
  tables: rows of sequences that moved (one device gather), table entries of new blocks, and the
  whole table of a sequence new to the batch. Rebuilding every table every step cost milliseconds
  at large batches and long contexts (docs/performance.md).
"""
from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # bytes: every array starts where any dtype view of it is legal


@dataclass
class PrefillInput:
    """One chunk per sequence: its new tokens, the tokens already in its KV, its block table."""

    token_ids: list[list[int]]
    prefix_lens: list[int]
    block_tables: list[list[int]]  # covering prefix + chunk
    src: list[int] | None = None  # per sequence: its first new token is entry src[i] of the previous ids (-1: host)


@dataclass
class DecodeInput:
    """One new token per sequence, at `position` (= tokens already in its KV cache)."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]  # covering position + 1 tokens
    src: list[int] | None = None  # as PrefillInput.src
    keys: list[Hashable] | None = None  # row identity across steps (same key: same blocks, grown at the end)


class Staging:
    """Host arrays -> device tensors through one pinned buffer and one copy, on the current stream."""

    def __init__(self, device: torch.device, nbytes: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self._turn = 0
        self._alloc(nbytes)

    def _alloc(self, nbytes: int) -> None:
        self._host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(2)]
        self._dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.pinned else None

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Device tensors holding `arrays` (same dtypes and shapes), valid until the next upload."""
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        if end > self._host[0].numel():
            self._alloc(max(end, 2 * self._host[0].numel()))
        host = self._host[self._turn]
        self._turn ^= 1
        flat = host.numpy()
        for a, off in zip(arrays, offsets):
            flat[off: off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        if self.pinned:
            self._dev[:end].copy_(host[:end], non_blocking=True)
            base = self._dev
        else:
            base = host.clone()[:end]  # the CPU: its own memory, so the next fill cannot change it
        return [base[off: off + a.nbytes].view(_TORCH[a.dtype]).view(a.shape) for a, off in zip(arrays, offsets)]


_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def check_lengths(seq_lens: np.ndarray, block_tables: Sequence[Sequence[int]], block_size: int,
                  max_model_len: int) -> None:
    """Clear errors for a sequence longer than the context or than its block table."""
    longest = int(seq_lens.max())
    if longest > max_model_len:
        raise ValueError(f"a sequence of {longest} tokens exceeds max_model_len {max_model_len}")
    for n, table in zip(seq_lens.tolist(), block_tables):
        if len(table) * block_size < n:
            raise ValueError(f"a block table of {len(table)} blocks cannot hold {n} tokens")


def block_table_array(tables: Sequence[Sequence[int]], rows: int, fill: int) -> np.ndarray:
    """Ragged block tables as one [rows, widest] int32 array; unused entries hold `fill` (never read)."""
    out = np.full((rows, max(1, max(map(len, tables), default=1))), fill, dtype=np.int32)
    for i, table in enumerate(tables):
        out[i, : len(table)] = table
    return out


@dataclass
class PrefillArrays:
    """Host inputs of one packed prefill step; token arrays padded to `tokens`, per-sequence ones to `seqs`."""

    token_rows: np.ndarray  # [3, tokens] int64: input ids, positions, cache slots (padding: id 0 at the scratch slot)
    cu_seqlens: np.ndarray  # [seqs + 1] int32 (padding sequences are empty)
    seq_lens: np.ndarray  # [seqs] int32
    last: np.ndarray  # [seqs] int64: packed index of each sequence's last new token
    tables: np.ndarray  # [num_seqs, widest] int32
    tiles: np.ndarray | None  # [N, 2] int32 tile map (Triton), None for the reference backend
    src_dst: np.ndarray  # [S] int64: packed indices whose token is on the device
    src_idx: np.ndarray  # [S] int64: where in the previous step's ids
    num_seqs: int
    max_seq_len: int
    decode_rows: int = 0  # leading single-token sequences left out of the tile map (decode_rows_apart)


def prefill_arrays(batch: PrefillInput, block_size: int, max_model_len: int, scratch_slot: int,
                   tile_tokens: int | None, tokens: int | None = None, seqs: int | None = None,
                   tile_capacity: int | None = None, decode_rows_apart: bool = False) -> PrefillArrays:
    """The packed inputs of `batch`; with `tokens`/`seqs`/`tile_capacity`, padded to a graph's shapes.
    `tile_tokens`: the Triton kernel's query tokens per program (its tile map), None for the reference backend.
    `decode_rows_apart` (Triton): the leading single-token sequences (a mixed step's decode rows come
    first) stay out of the tile map; the split-KV decode kernel attends them (AttentionMetadata.decode_rows)."""
    q_lens = np.array([len(t) for t in batch.token_ids], dtype=np.int64)
    if q_lens.size == 0 or q_lens.min() < 1:
        raise ValueError("a prefill batch needs at least one sequence and one token per sequence")
    prefix = np.array(batch.prefix_lens, dtype=np.int64)
    seq_lens = prefix + q_lens
    check_lengths(seq_lens, batch.block_tables, block_size, max_model_len)
    n, total = len(q_lens), int(q_lens.sum())
    tokens, seqs = tokens or total, seqs or n
    if total > tokens or n > seqs:
        raise ValueError(f"{total} tokens of {n} sequences do not fit a step of {tokens} tokens and {seqs} sequences")
    cu = np.full(seqs + 1, total, dtype=np.int32)
    cu[0] = 0
    cu[1: n + 1] = np.cumsum(q_lens)
    seq_idx = np.repeat(np.arange(n), q_lens)
    rows = np.zeros((3, tokens), dtype=np.int64)
    rows[2] = scratch_slot
    positions = np.arange(total) - cu[seq_idx] + prefix[seq_idx]
    tables = block_table_array(batch.block_tables, n, fill=0)
    rows[0, :total] = np.fromiter(itertools.chain.from_iterable(batch.token_ids), dtype=np.int64, count=total)
    rows[1, :total] = positions
    rows[2, :total] = tables[seq_idx, positions // block_size].astype(np.int64) * block_size + positions % block_size
    lens = np.zeros(seqs, dtype=np.int32)
    lens[:n] = seq_lens
    last = np.zeros(seqs, dtype=np.int64)
    last[:n] = cu[1: n + 1] - 1
    src = np.asarray(batch.src if batch.src is not None else [], dtype=np.int64)
    on_device = np.flatnonzero(src >= 0)
    tiles, decode_rows = None, 0
    if tile_tokens is not None:
        from nexus_tune.engine.kernels.prefill_attention import tile_map  # triton: only the Triton backend gets here

        if decode_rows_apart:
            single = q_lens == 1
            decode_rows = n if single.all() else int(np.argmin(single))
        tiles = tile_map(np.where(np.arange(n) < decode_rows, 0, q_lens), prefix, tile_tokens, tile_capacity)
    return PrefillArrays(rows, cu, lens, last, tables, tiles, cu[on_device].astype(np.int64), src[on_device],
                         n, int(seq_lens.max()), decode_rows)


class DecodeRows:
    """The decode batch on the device: ids, positions and slots [3, rows] and block tables [rows, max_blocks].

    Row i of a step holds its i-th sequence; rows past the batch are padding (id 0 at position 0,
    writing the scratch slot). A padding row's table may keep an old sequence's blocks: it reads
    one KV token from them and writes nothing there. Sequences are known by `DecodeInput.keys`;
    a key must change when a sequence's blocks are replaced (the engine keys by id and preemptions).
    """

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, scratch_block: int, device: torch.device):
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.tokens = torch.zeros(3, max_rows, dtype=torch.int64, device=device)
        self.tokens[2] = self.scratch_slot
        self.block_tables = torch.full((max_rows, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self._keys: list[Hashable] = []  # row -> key of the sequence whose table it holds
        self._written: list[int] = []  # row -> table entries on the device

    def load(self, batch: DecodeInput, rows: int, staging: Staging, prev_ids: torch.Tensor | None,
             max_model_len: int) -> None:
        """Make rows [0, rows) hold `batch` (padded), on the current stream."""
        n = len(batch.token_ids)
        if n == 0:
            raise ValueError("a decode batch needs at least one sequence")
        if n > rows or rows > self.tokens.shape[1]:
            raise ValueError(f"{n} sequences do not fit {rows} rows (at most {self.tokens.shape[1]})")
        positions = np.asarray(batch.positions, dtype=np.int64)
        check_lengths(positions + 1, batch.block_tables, self.block_size, max_model_len)
        keys = batch.keys if batch.keys is not None else [object() for _ in range(n)]  # no keys: all new
        moves, written, table_updates = self._plan_tables(keys, positions, batch.block_tables)
        bs = self.block_size
        token_rows = np.zeros((3, rows), dtype=np.int64)
        token_rows[0, :n] = batch.token_ids
        token_rows[1, :n] = positions
        token_rows[2] = self.scratch_slot
        token_rows[2, :n] = [t[p // bs] * bs + p % bs for t, p in zip(batch.block_tables, positions.tolist())]
        src = np.asarray(batch.src if batch.src is not None else [], dtype=np.int64)
        pend = np.flatnonzero(src >= 0)
        dev_rows, move_dst, move_src, upd_at, upd_val, pend_dst, pend_src = staging.upload(
            token_rows, moves[0], moves[1], table_updates[0], table_updates[1], pend, src[pend])
        self.tokens[:, :rows].copy_(dev_rows)
        if move_dst.numel():
            self.block_tables[move_dst] = self.block_tables[move_src]
        if upd_val.numel():
            self.block_tables.view(-1)[upd_at] = upd_val
        if pend_dst.numel():
            if prev_ids is None:
                raise ValueError("a token on the device was asked for, but no previous step's ids were given")
            self.tokens[0].index_copy_(0, pend_dst, prev_ids.index_select(0, pend_src))
        self._keys, self._written = list(keys), written

    def _plan_tables(self, keys: Sequence[Hashable], positions: np.ndarray, tables: Sequence[Sequence[int]]
                     ) -> tuple[tuple[np.ndarray, np.ndarray], list[int], tuple[np.ndarray, np.ndarray]]:
        """(rows to gather (dst, src), entries on the device per row after the step, new entries (flat index, id))."""
        old = {k: i for i, k in enumerate(self._keys)}
        width = self.block_tables.shape[1]
        dst, src, written, at, val = [], [], [], [], []
        for i, (key, pos, table) in enumerate(zip(keys, positions.tolist(), tables)):
            j = old.get(key, -1)
            have = self._written[j] if j >= 0 else 0
            if j >= 0 and j != i:
                dst.append(i)
                src.append(j)
            need = pos // self.block_size + 1
            if need > have:
                at.extend(range(i * width + have, i * width + need))
                val.extend(table[have:need])
            written.append(max(need, have))
        return ((np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64)), written,
                (np.array(at, dtype=np.int64), np.array(val, dtype=np.int32)))
