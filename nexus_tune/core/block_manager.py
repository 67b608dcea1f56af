"""Paged KV-cache blocks: allocation, admission checks and frees deferred behind fences.

Prefill and decode run on two streams. A block freed on one stream may still be read or written
by kernels queued there, so `free(seq, fence)` parks the blocks until `fence.query()` is true
(the engine passes a `torch.cuda.Event` recorded after its last use); only then can the other
stream's sequences get them. Pure Python; the caller (the scheduler) holds the lock.
"""
from __future__ import annotations

from typing import Protocol

from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.sequence import Sequence


class Fence(Protocol):
    def query(self) -> bool: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = EngineConfig.block_size):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (it is likely still in L2).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._fenced: list[tuple[Fence, list[int]]] = []

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (fenced blocks count once their fence has passed)."""
        self._release_passed_fences()
        return len(self._free)

    @property
    def num_fenced(self) -> int:
        return sum(len(blocks) for _, blocks in self._fenced)

    @property
    def usage(self) -> float:
        """Share of blocks not available (held by sequences or behind a fence)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens of KV."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False (and no change) if blocks are short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            self._release_passed_fences()
            if need > len(self._free):
                return False
        for _ in range(need):
            seq.block_table.append(self._free.pop())
        return True

    def free(self, seq: Sequence, fence: Fence | None = None) -> None:
        """Return all of `seq`'s blocks; behind `fence` they are not reused until `fence.query()`."""
        if not seq.block_table:
            return
        if fence is None:
            self._free.extend(reversed(seq.block_table))
        else:
            self._fenced.append((fence, seq.block_table))
        seq.block_table = []

    def _release_passed_fences(self) -> None:
        if not self._fenced:
            return
        pending = []
        for fence, blocks in self._fenced:
            if fence.query():
                self._free.extend(reversed(blocks))
            else:
                pending.append((fence, blocks))
        self._fenced = pending
