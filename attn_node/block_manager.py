"""Paged latent KV cache bookkeeping: fixed-size blocks, a free list, per-sequence block tables.

Pure bookkeeping (no tensors): the runner owns the cache tensors and turns
block tables into slot indices. A request reserves the blocks for its longest
possible length when it is admitted, so a running request can never run out of
cache mid-generation and nothing is ever evicted; a request that does not fit
waits until enough blocks are free.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` tokens in total."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError(f"{need} KV blocks needed, {len(self._free)} free: call can_reserve first")
        seq.block_table.extend(self._free.popleft() for _ in range(max(need, 0)))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
