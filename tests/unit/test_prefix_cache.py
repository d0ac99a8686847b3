"""The block-level prefix cache (attn_node/block_manager.py) and its chain keys (moemesh/prefix_hash.py).

Hash chains, sharing with reference counts, idle blocks evicted least recently used and only when a new
request needs room, exact admission with shared blocks, and the two rules that keep sharing exact: only
full prompt blocks are shared, and the last prompt token is always computed.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest

from moemesh.attn_node.block_manager import BlockManager
from moemesh.attn_node.sequence import Sequence
from moemesh.prefix_hash import ROOT_HASH, block_hashes, chain_hash
from moemesh.sampling import SamplingParams


def seq(prompt: list[int], max_tokens: int = 1, name: str = "s") -> Sequence:
    return Sequence(name, list(prompt), SamplingParams(max_tokens=max_tokens), 0)


def run_prompt(bm: BlockManager, s: Sequence) -> None:
    """Admit ``s`` and mark its whole prompt computed (as the scheduler's postprocess would), then commit."""
    bm.admit(s)
    s.num_cached = len(s.prompt_ids)
    bm.commit(s)


# ---- chain keys ----------------------------------------------------------------


def test_chain_hash_is_blake2b_of_parent_and_packed_ids():
    expect = hashlib.blake2b(struct.pack("<Q", 7) + struct.pack("<3q", 1, 2, 3), digest_size=8).digest()
    assert chain_hash(7, [1, 2, 3]) == int.from_bytes(expect, "little")
    assert 0 <= chain_hash(2**64 - 1, [0]) < 2**64


def test_block_hashes_chain_over_full_blocks_only():
    ids = list(range(10))
    keys = block_hashes(ids, 4)
    assert len(keys) == 2  # the last two ids make a partial block: no key
    assert keys[0] == chain_hash(ROOT_HASH, [0, 1, 2, 3])
    assert keys[1] == chain_hash(keys[0], [4, 5, 6, 7])
    assert block_hashes(ids, 4, limit=1) == keys[:1]
    assert block_hashes(ids[:3], 4) == []
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(ids, 0)


def test_a_key_names_the_whole_prefix_not_just_the_block():
    a = block_hashes([1, 2, 9, 9], 2)
    b = block_hashes([3, 4, 9, 9], 2)
    assert a[1] != b[1]  # same second block, different parents
    assert block_hashes([1, 2, 9, 9, 5], 2) == a


def test_keys_are_the_same_in_another_process():
    code = "from moemesh.prefix_hash import block_hashes; print(block_hashes(list(range(40)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str(block_hashes(list(range(40)), 16))


# ---- sharing ---------------------------------------------------------------------


def test_a_second_prompt_shares_the_first_ones_full_blocks():
    bm = BlockManager(10, 4)
    a = seq(list(range(10)), name="a")  # blocks [0..3] [4..7] and a partial [8, 9]
    run_prompt(bm, a)
    assert bm.cached_blocks == 2
    b = seq(list(range(8)) + [50, 51, 52], name="b")
    assert bm.admit(b) == 8
    assert b.num_cached == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert (bm.prompt_tokens, bm.prefix_hit_tokens) == (21, 8)


def test_a_prefix_ending_inside_a_block_shares_only_the_full_blocks_before_it():
    bm = BlockManager(10, 4)
    a = seq(list(range(12)), name="a")
    run_prompt(bm, a)
    b = seq(list(range(6)) + [99] * 6, name="b")  # agrees with a on 6 tokens: one full block, then half a block
    assert bm.admit(b) == 4
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(10, 4)
    a = seq(list(range(8)), name="a")
    run_prompt(bm, a)
    same = seq(list(range(8)), name="same")  # every block cached: shares all but the last, recomputes that
    assert bm.admit(same) == 4
    assert same.block_table[0] == a.block_table[0] and same.block_table[1] != a.block_table[1]
    one_more = seq(list(range(9)), name="one_more")  # the whole of a, plus one token to compute
    assert bm.admit(one_more) == 8


def test_recomputed_duplicate_blocks_stay_private():
    bm = BlockManager(6, 4)
    a, b = seq(list(range(8)), name="a"), seq(list(range(8)), name="b")
    bm.admit(a)
    bm.admit(b)  # admitted together: nothing cached yet, both prefill everything
    for s in (a, b):
        s.num_cached = 8
        bm.commit(s)
    assert bm.cached_blocks == 2
    bm.free(b)
    assert bm.snapshot().num_free == 6 - 2  # b's blocks went back plain; a still holds its two
    assert set(bm.snapshot().prefix_hashes) == set(block_hashes(list(range(8)), 4))


def test_commit_registers_blocks_as_chunks_fill_them_and_never_decode_blocks():
    bm = BlockManager(10, 4)
    a = seq(list(range(10)), max_tokens=8, name="a")
    bm.admit(a)
    a.num_cached = 3
    bm.commit(a)
    assert bm.cached_blocks == 0
    a.num_cached = 5
    bm.commit(a)
    assert bm.cached_blocks == 1
    a.num_cached = 10
    bm.commit(a)
    assert bm.cached_blocks == 2
    a.output_ids = [1, 2, 3, 4, 5, 6]
    a.num_cached = 16  # decode filled the rest of block 2 and block 3: not registered
    bm.commit(a)
    assert bm.cached_blocks == 2


def test_disabled_cache_shares_nothing():
    bm = BlockManager(10, 4, prefix_cache=False)
    a = seq(list(range(9)), name="a")
    run_prompt(bm, a)
    b = seq(list(range(9)), name="b")
    assert bm.admit(b) == 0
    assert not set(a.block_table) & set(b.block_table)
    assert bm.cached_blocks == 0 and bm.snapshot().prefix_hashes == ()


# ---- reference counts, idle blocks, LRU eviction ---------------------------------


def test_shared_blocks_are_counted_and_released_once_per_holder():
    bm = BlockManager(8, 4)
    a = seq(list(range(9)), name="a")
    run_prompt(bm, a)  # a: 3 blocks, 2 cached
    b = seq(list(range(9)), name="b")
    bm.admit(b)  # shares 2, takes 1
    assert bm.num_free == 8 - 4
    bm.free(a)
    assert bm.num_free == 8 - 3  # a's private block is free; the shared two are still b's
    bm.free(b)
    assert bm.num_free == 8
    assert bm.cached_blocks == 2  # freed, still cached (idle)
    c = seq(list(range(9)), name="c")
    assert bm.admit(c) == 8  # reused after both holders left


def test_idle_cached_blocks_are_evicted_only_when_plain_blocks_run_out():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5], name="a")  # 3 blocks, 2 cached
    run_prompt(bm, a)
    bm.free(a)
    b = seq([7, 8, 7], name="b")  # two blocks: the never-cached one and a's private one
    bm.admit(b)
    assert bm.evicted_blocks == 0 and bm.cached_blocks == 2
    c = seq([9, 9], name="c")
    bm.admit(c)  # now an idle cached block must go
    assert bm.evicted_blocks == 1 and bm.cached_blocks == 1
    # The tail of a's chain went first: its first block is still there to share.
    bm.free(b)
    bm.free(c)
    assert bm.admit(seq([1, 2, 3, 4, 5], name="a2")) == 2


def test_eviction_is_least_recently_used():
    bm = BlockManager(3, 2)
    old, new = seq([1, 2, 0], name="old"), seq([3, 4, 0], name="new")
    run_prompt(bm, old)
    bm.free(old)  # old's cached block is idle first...
    run_prompt(bm, new)
    bm.free(new)  # ...then new's
    hit = seq([1, 2, 5], name="hit")
    assert bm.admit(hit) == 2  # using old's block makes it recently used again
    bm.free(hit)
    assert bm.snapshot().prefix_hashes == (block_hashes([1, 2], 2)[0], block_hashes([3, 4], 2)[0])
    filler = seq([6, 6, 6, 6, 6], name="filler")  # 3 blocks: every free block, evicting both, new's first
    bm.admit(filler)
    assert bm.evicted_blocks == 2 and bm.cached_blocks == 0


def test_a_block_in_use_is_never_evicted():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3], max_tokens=2, name="a")  # 2 blocks, holds 1 cached block
    run_prompt(bm, a)
    assert not bm.can_admit(seq([5] * 5, name="big"))  # 3 blocks needed, 2 free: it waits
    with pytest.raises(RuntimeError):
        bm.admit(seq([5] * 5, name="big"))
    assert bm.cached_blocks == 1 and bm.evicted_blocks == 0
    b = seq([1, 2, 4], max_tokens=2, name="b")  # shares a's block, needs one more
    assert bm.admit(b) == 2
    assert bm.num_free == 1


# ---- exact admission with shared blocks -----------------------------------------


def test_admission_counts_idle_shared_blocks_out_of_the_free_ones():
    bm = BlockManager(3, 2)
    a = seq([1, 2, 3, 4, 5], name="a")  # 3 blocks, 2 cached
    run_prompt(bm, a)
    bm.free(a)
    assert bm.num_free == 3
    # Shares a's two idle blocks and needs 2 more (7 tokens): only one is free once the two are held.
    too_big = seq([1, 2, 3, 4, 5], max_tokens=3, name="big")
    assert not bm.can_admit(too_big)
    with pytest.raises(RuntimeError):
        bm.admit(too_big)
    assert too_big.block_table == [] and bm.num_free == 3 and bm.cached_blocks == 2
    fits = seq([1, 2, 3, 4, 5], max_tokens=2, name="fits")  # 6 tokens: the two shared and one more
    assert bm.can_admit(fits)
    assert bm.admit(fits) == 4 and bm.num_free == 0
    assert bm.evicted_blocks == 0


def test_sharing_lets_more_requests_in_than_the_cache_would_hold_alone():
    bm = BlockManager(5, 4)
    prefix = list(range(12))
    first = seq(prefix + [100], name="r0")
    run_prompt(bm, first)  # 4 blocks: 3 shared + 1
    admitted = [first]
    for i in range(1, 4):
        s = seq(prefix + [100 + i], name=f"r{i}")
        if not bm.can_admit(s):
            break
        bm.admit(s)
        admitted.append(s)
    assert len(admitted) == 2  # each needs 1 block of its own; 5 blocks = 3 shared + 2 own
    assert bm.num_free == 0


def test_admitting_twice_is_refused():
    bm = BlockManager(4, 2)
    s = seq([1, 2, 3])
    bm.admit(s)
    with pytest.raises(RuntimeError, match="already holds"):
        bm.admit(s)


def test_snapshot_lists_in_use_keys_then_idle_newest_first_capped():
    bm = BlockManager(8, 2)
    a, b = seq([1, 2, 3], name="a"), seq([4, 5, 6], name="b")
    run_prompt(bm, a)
    run_prompt(bm, b)
    bm.free(a)
    snap = bm.snapshot()
    ka, kb = block_hashes([1, 2], 2)[0], block_hashes([4, 5], 2)[0]
    assert snap.prefix_hashes == (kb, ka)
    assert bm.snapshot(max_hashes=1).prefix_hashes == (kb,)
    assert (snap.prompt_tokens, snap.prefix_hit_tokens, snap.cached_blocks, snap.evicted_blocks) == (6, 0, 2, 0)
    assert snap.num_free == 8 - 2
