"""Which attention node takes a request: the pure policy, no I/O.

Fewest sequences running + waiting first, then the most free KV cache (tokens), then the node id
(so equal nodes are chosen deterministically). Nodes whose load is unknown (their Load call failed
or timed out) come after every node with a known load, by id: worth a try only when nothing else is.

    >>> a = NodeLoad("attn-0", running=2, waiting=0, cache_free_tokens=100, cache_total_tokens=128)
    >>> b = NodeLoad("attn-1", running=1, waiting=0, cache_free_tokens=10, cache_total_tokens=128)
    >>> pick_node([a, b]).node_id
    'attn-1'
    >>> pick_node([a, b], exclude={"attn-1"}).node_id
    'attn-0'
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeLoad:
    """One attention node's load as its Load RPC reports it; ``known=False`` when it did not answer."""

    node_id: str
    running: int = 0
    waiting: int = 0
    cache_free_tokens: int = 0
    cache_total_tokens: int = 0
    known: bool = True
    # The node's prefix cache (attn_node/block_manager.py), as its Load reply counts it since it started.
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    cached_blocks: int = 0
    evicted_blocks: int = 0
    micro_batches: int = 0  # ping-pong micro-batches its engine runs now (0: a node too old to say)

    @property
    def queue(self) -> int:
        return self.running + self.waiting

    @property
    def cache_free(self) -> float:
        """Free fraction of the KV cache (0 when the total is unknown)."""
        return self.cache_free_tokens / self.cache_total_tokens if self.cache_total_tokens else 0.0


def _key(load: NodeLoad) -> tuple:
    if not load.known:
        return (1, 0, 0, load.node_id)
    return (0, load.queue, -load.cache_free_tokens, load.node_id)


def rank_nodes(candidates: Iterable[NodeLoad], exclude: Collection[str] = ()) -> list[NodeLoad]:
    """Every candidate not in ``exclude``, best first: the order in which to try them."""
    return sorted((c for c in candidates if c.node_id not in exclude), key=_key)


def pick_node(candidates: Iterable[NodeLoad], exclude: Collection[str] = ()) -> NodeLoad | None:
    """The best candidate not in ``exclude`` (nodes already tried), or None if none is left."""
    ranked = rank_nodes(candidates, exclude)
    return ranked[0] if ranked else None
