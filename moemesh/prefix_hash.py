"""Chain hashes of a token sequence's full cache blocks: the prefix cache's keys, shared by node and router.

Block ``i`` of a prompt is keyed by ``hash(key of block i-1, the block's token ids)``, so a key names the
whole prefix up to the end of its block, not just the block's own tokens (vLLM's automatic prefix caching
keys blocks the same way). Only full blocks have a key: a partial last block is never shared.

The hash is BLAKE2b with an 8-byte digest over the parent key and the ids packed as little-endian int64,
so it is the same in every process and on every machine (Python's ``hash()`` is salted per process). The
attention node keys its cache with it and publishes the keys in its Load reply; the router computes a
prompt's keys with the same function to find the node that holds its longest prefix.

    >>> keys = block_hashes([1, 2, 3, 4, 5], block_size=2)
    >>> len(keys)  # two full blocks; the fifth token is in a partial block
    2
    >>> keys[0] == block_hashes([1, 2], 2)[0] and keys[1] != block_hashes([3, 4], 2)[0]
    True
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0  # the parent key of a prompt's first block


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The key of a block holding ``token_ids`` whose predecessor's key is ``parent`` (an unsigned 64-bit int)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Keys of the full blocks of ``token_ids`` in order (at most ``limit`` of them)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, max(limit, 0))
    keys, parent = [], ROOT_HASH
    for i in range(n):
        parent = chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys
