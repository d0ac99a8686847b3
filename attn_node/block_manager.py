"""Paged latent KV cache bookkeeping: fixed-size blocks, per-sequence block tables, and the prefix cache.

Pure bookkeeping (no tensors): the runner owns the cache tensors and turns block tables into slot
indices. A request reserves the blocks for its longest possible length when it is admitted, so a
running request can never run out of cache mid-generation; a request that does not fit waits until
enough blocks are free ("wait, never evict silently").

Prefix cache (vLLM's automatic prefix caching, over MLA's latent blocks): a full block of prompt
tokens, once computed, is registered under its chain key (moemesh/prefix_hash.py: the hash of the
parent block's key and the block's token ids, so a key names the whole prefix up to its end). A later
request whose prompt starts with the same blocks shares them read-only: its block table points at
them, their reference count goes up, and only the rest of its prompt is prefilled. When the last
sequence holding a cached block frees it, the block stays cached but idle: it counts as free, and is
evicted (its key dropped, its slots reused) only when a new request needs a block and no never-cached
block is left, least recently used first. A block in use (reference count > 0) is never evicted.

Why no copy-on-write: only full blocks of prompt tokens are ever shared, and a sequence only writes
positions at or past its own ``num_cached``, which starts at the end of its shared blocks. A shared
block is therefore never written again; a sequence's partial last prompt block and the blocks its
decode fills are its own. The last prompt token is always computed (the sampler needs its logits),
so a prompt whose every block is cached shares all but its last block and recomputes that one into a
private block (vLLM does the same).

Only prompt blocks are registered, not blocks that decode filled: decode computes the latent through
the absorbed-MLA path, whose rounding differs from a prefill's in the last bits, and sharing such a
block would make a cached prompt's logits differ from the same prompt prefilled without the cache.

Admission is exact: a request needs ``blocks_for(max total) - shared`` new blocks, and shared blocks
that were idle stop counting as free once it holds them, so ``can_admit`` counts them out of the
free blocks first.

``snapshot`` may be called from another thread (the service's Load RPC) while the engine thread
mutates the manager: every mutation and the snapshot hold one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from moemesh.prefix_hash import block_hashes

from .sequence import Sequence


@dataclass(frozen=True)
class CacheSnapshot:
    """What the Load RPC reports: free blocks, prefix-cache counters and the cached keys (newest first)."""

    num_free: int
    prompt_tokens: int  # prompt tokens of admitted requests since start
    prefix_hit_tokens: int  # of which were shared from cached blocks, not prefilled
    cached_blocks: int  # blocks registered under a key, in use or idle
    evicted_blocks: int  # idle cached blocks given to new requests since start
    prefix_hashes: tuple[int, ...]  # keys of cached blocks, most recently used first (capped)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._plain: deque[int] = deque(range(num_blocks))  # free blocks holding no cached prefix
        self._idle: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recently used first
        self._refs = [0] * num_blocks
        self._key: list[int | None] = [None] * num_blocks  # block -> its chain key while cached
        self._by_key: dict[int, int] = {}  # chain key -> block
        self.prompt_tokens = 0
        self.prefix_hit_tokens = 0
        self.evicted_blocks = 0
        self._lock = threading.Lock()

    # ---- sizes ------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new request can get: never-cached ones and idle cached ones (evictable)."""
        return len(self._plain) + len(self._idle)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def cached_blocks(self) -> int:
        return len(self._by_key)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- plain reservations (no prefix sharing) ----------------------------
    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` tokens in total (new blocks, never shared ones)."""
        with self._lock:
            self._extend(seq, num_tokens)

    def _extend(self, seq: Sequence, num_tokens: int) -> None:
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError(f"{need} KV blocks needed, {self.num_free} free: call can_reserve first")
        seq.block_table.extend(self._take() for _ in range(max(need, 0)))

    def _take(self) -> int:
        """A free block for a new owner: a never-cached one first, else evict the least recently used."""
        if self._plain:
            block = self._plain.popleft()
        else:
            block, _ = self._idle.popitem(last=False)
            del self._by_key[self._key[block]]
            self._key[block] = None
            self.evicted_blocks += 1
        self._refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks; cached ones stay cached, idle, at the recently used end."""
        with self._lock:
            # Last block first, so a chain's tail is evicted before the parents other prompts may share.
            for block in reversed(seq.block_table):
                self._refs[block] -= 1
                if self._refs[block] > 0:
                    continue
                if self._key[block] is not None:
                    self._idle[block] = None
                else:
                    self._plain.append(block)
            seq.block_table = []

    # ---- prefix sharing ----------------------------------------------------
    def _hashes(self, seq: Sequence) -> list[int]:
        if seq.prompt_hashes is None:
            seq.prompt_hashes = block_hashes(seq.prompt_ids, self.block_size)
        return seq.prompt_hashes

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold ``seq``'s longest cached prompt prefix, leaving its last token to compute."""
        if not self.prefix_cache:
            return []
        shareable = (len(seq.prompt_ids) - 1) // self.block_size  # full blocks before the last prompt token
        hit = []
        for key in self._hashes(seq)[:shareable]:
            block = self._by_key.get(key)
            if block is None:
                break
            hit.append(block)
        return hit

    def _new_blocks_ok(self, seq: Sequence, hit: list[int]) -> bool:
        idle_hit = sum(1 for b in hit if self._refs[b] == 0)  # free now, not once seq holds them
        return self.blocks_for(seq.max_total_tokens) - len(hit) <= self.num_free - idle_hit

    def can_admit(self, seq: Sequence) -> bool:
        """Whether ``seq`` fits now, sharing the cached blocks of its prompt's prefix."""
        return self._new_blocks_ok(seq, self.match(seq))

    def admit(self, seq: Sequence) -> int:
        """Give a waiting ``seq`` its blocks for its whole max length, sharing its cached prefix; returns the
        prefix tokens shared (``seq.num_cached`` starts there)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id!r} already holds blocks")
        with self._lock:
            hit = self.match(seq)
            if not self._new_blocks_ok(seq, hit):
                raise RuntimeError("not enough free KV blocks: call can_admit first")
            for block in hit:
                if self._refs[block] == 0:
                    del self._idle[block]
                self._refs[block] += 1
            seq.block_table = list(hit)
            self._extend(seq, seq.max_total_tokens)
            seq.num_committed_blocks = len(hit)
            seq.num_cached = len(hit) * self.block_size
            self.prompt_tokens += len(seq.prompt_ids)
            self.prefix_hit_tokens += seq.num_cached
        return seq.num_cached

    def commit(self, seq: Sequence) -> None:
        """Register the prompt blocks ``seq`` has fully computed (call after its cache advanced)."""
        if not self.prefix_cache:
            return
        full = min(seq.num_cached, len(seq.prompt_ids)) // self.block_size
        if full <= seq.num_committed_blocks:
            return
        keys = self._hashes(seq)
        with self._lock:
            for i in range(seq.num_committed_blocks, full):
                block, key = seq.block_table[i], keys[i]
                # A key another block already holds (two requests prefilled the same prefix together): keep
                # the first; this block stays private and goes back to the plain free list when freed.
                if key not in self._by_key and self._key[block] is None:
                    self._by_key[key] = block
                    self._key[block] = key
            seq.num_committed_blocks = full

    def snapshot(self, max_hashes: int = 4096) -> CacheSnapshot:
        """Counters and cached keys, most recently used first (blocks in use, then idle newest first)."""
        with self._lock:
            keys: tuple[int, ...] = ()
            if max_hashes > 0:
                in_use = [k for k, b in self._by_key.items() if self._refs[b] > 0]
                idle = [self._key[b] for b in reversed(self._idle)]
                keys = tuple((in_use + idle)[:max_hashes])
            return CacheSnapshot(self.num_free, self.prompt_tokens, self.prefix_hit_tokens, len(self._by_key),
                                 self.evicted_blocks, keys)
