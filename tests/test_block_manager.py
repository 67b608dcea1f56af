import pytest

from nexus_tune.core.block_manager import BlockManager
from nexus_tune.core.sequence import Sequence


class Flag:
    """A fence the test opens by hand (the engine passes a torch.cuda.Event)."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def seq(n: int, sid: str = "s") -> Sequence:
    return Sequence(sid, [1] * n)


def test_allocate_grows_the_table_by_whole_blocks():
    bm = BlockManager(num_blocks=8, block_size=16)
    s = seq(20)
    assert bm.allocate(s, 20)
    assert len(s.block_table) == 2 and bm.num_free == 6
    assert bm.allocate(s, 32)  # still fits in two blocks
    assert len(s.block_table) == 2
    assert bm.allocate(s, 33)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.usage == pytest.approx(3 / 8)


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = seq(8, "a"), seq(8, "b")
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and bm.num_free == 1
    assert bm.blocks_needed(b, 8) == 2


def test_free_returns_blocks_for_reuse():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(16, "a"), seq(16, "b")
    assert bm.allocate(a, 16)
    held = set(a.block_table)
    bm.free(a)
    assert a.block_table == [] and bm.num_free == 4
    assert bm.allocate(b, 16)
    assert set(b.block_table) == held


def test_fenced_blocks_are_not_reused_until_the_fence_passes():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(16, "a"), seq(8, "b")
    assert bm.allocate(a, 16)
    fence = Flag()
    bm.free(a, fence)
    assert bm.num_free == 0 and bm.num_fenced == 4 and bm.usage == 1.0
    assert not bm.allocate(b, 8)
    fence.done = True
    assert bm.allocate(b, 8)
    assert bm.num_fenced == 0 and bm.num_free == 2


def test_fences_release_independently():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(8, "a"), seq(8, "b")
    assert bm.allocate(a, 8) and bm.allocate(b, 8)
    slow, fast = Flag(), Flag()
    bm.free(a, slow)
    bm.free(b, fast)
    fast.done = True
    assert bm.num_free == 2 and bm.num_fenced == 2


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(0)
    with pytest.raises(ValueError):
        BlockManager(4, block_size=0)
