"""BlockManager: paged-cache bookkeeping (block counts, reserve/extend, free/reuse, exhaustion, slots)."""

from __future__ import annotations

import pytest

from moemesh.attn_node.block_manager import BlockManager
from moemesh.attn_node.sequence import Sequence
from moemesh.sampling import SamplingParams


def make_seq(name: str = "s", prompt_len: int = 1) -> Sequence:
    return Sequence(name, list(range(prompt_len)), SamplingParams(), 0)


def test_rejects_empty_cache():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_sizes():
    bm = BlockManager(5, 4)
    assert bm.num_blocks == 5
    assert bm.num_free == 5
    assert bm.capacity_tokens == 20


@pytest.mark.parametrize(
    "block_size, tokens, blocks",
    [(4, 0, 0), (4, 1, 1), (4, 3, 1), (4, 4, 1), (4, 5, 2), (4, 8, 2), (4, 9, 3), (1, 7, 7), (16, 33, 3)],
)
def test_blocks_for(block_size, tokens, blocks):
    assert BlockManager(10, block_size).blocks_for(tokens) == blocks


def test_reserve_takes_blocks_in_order_and_extends():
    bm = BlockManager(6, 4)
    seq = make_seq()
    bm.reserve(seq, 5)
    assert seq.block_table == [0, 1]
    assert bm.num_free == 4
    bm.reserve(seq, 8)  # still fits in two blocks: nothing new
    assert seq.block_table == [0, 1]
    bm.reserve(seq, 9)  # extends the existing table by one block
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free == 3
    bm.reserve(seq, 2)  # shrinking never gives blocks back
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free == 3
    other = make_seq("o")
    bm.reserve(other, 4)
    assert other.block_table == [3]
    assert bm.num_free == 2


def test_free_returns_blocks_and_they_are_reused():
    bm = BlockManager(3, 4)
    a, b, c = make_seq("a"), make_seq("b"), make_seq("c")
    bm.reserve(a, 8)
    bm.reserve(b, 4)
    assert (a.block_table, b.block_table, bm.num_free) == ([0, 1], [2], 0)
    assert not bm.can_reserve(1)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free == 2
    assert bm.can_reserve(8)
    bm.reserve(c, 8)
    assert sorted(c.block_table) == [0, 1]
    assert bm.num_free == 0
    bm.free(b)
    bm.free(c)
    assert bm.num_free == 3
    # Every block is back exactly once: a full-cache reservation gets all three, no duplicates.
    full = make_seq("full")
    bm.reserve(full, 12)
    assert sorted(full.block_table) == [0, 1, 2]


def test_free_twice_does_not_duplicate_blocks():
    bm = BlockManager(2, 4)
    a = make_seq()
    bm.reserve(a, 4)
    bm.free(a)
    bm.free(a)
    assert bm.num_free == 2


def test_exhaustion():
    bm = BlockManager(4, 4)
    a, b = make_seq("a"), make_seq("b")
    assert bm.can_reserve(16)
    assert not bm.can_reserve(17)
    bm.reserve(a, 12)
    assert bm.can_reserve(4)
    assert not bm.can_reserve(5)
    with pytest.raises(RuntimeError):
        bm.reserve(b, 5)
    # A failed reserve takes nothing.
    assert b.block_table == []
    assert bm.num_free == 1
    with pytest.raises(RuntimeError):
        bm.reserve(a, 20)  # extending beyond what is free also fails
    assert a.block_table == [0, 1, 2]
    assert bm.num_free == 1


def test_slot_arithmetic():
    bm = BlockManager(8, 4)
    seq = make_seq()
    seq.block_table = [5, 2, 7]
    expected = {0: 20, 1: 21, 3: 23, 4: 8, 6: 10, 7: 11, 8: 28, 11: 31}
    assert {p: bm.slot(seq, p) for p in expected} == expected


def test_slots_of_distinct_sequences_never_collide():
    bm = BlockManager(6, 3)
    a, b = make_seq("a"), make_seq("b")
    bm.reserve(a, 7)
    bm.reserve(b, 9)
    slots_a = {bm.slot(a, p) for p in range(7)}
    slots_b = {bm.slot(b, p) for p in range(9)}
    assert len(slots_a) == 7 and len(slots_b) == 9
    assert not slots_a & slots_b
    assert all(0 <= s < bm.capacity_tokens for s in slots_a | slots_b)
