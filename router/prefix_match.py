"""Prefix-aware node choice: send a prompt to the attention node that already caches its longest prefix.

Pure policy, no I/O (router/pool.py feeds it). A node's cached prefixes are the chain keys of its cached
blocks (moemesh/prefix_hash.py), as its Load reply lists them, plus the prompts this router sent it
recently (``NodePrefixes.note``): a node registers a prompt's blocks only once it has prefilled them, and
a burst of requests sharing a prefix would otherwise spread over every node before the first reply shows
the prefix anywhere (SGLang's cache-aware router keeps such a tree of what it routed, for the same reason).

The score (``prefer_prefix_holder``), over the candidates in load order (router/selection.py's
``rank_nodes``: fewest running + waiting first):

- a node's match is the number of leading prompt blocks whose keys it holds, times its block size,
  in tokens;
- a node is *overloaded* when its queue exceeds the least-loaded candidate's by more than
  ``balance_abs`` sequences AND is more than ``balance_rel`` times it (SGLang's balance thresholds:
  both must hold, so a small absolute gap on idle nodes never counts as imbalance);
- among the candidates that are not overloaded and match at least ``min_match_tokens``, the one with
  the longest match goes first (ties: the less loaded); every other candidate keeps its load order.
  With no such candidate the order is load order: load wins.

    >>> a, b = NodeLoad("attn-0", running=1), NodeLoad("attn-1", running=3)
    >>> [n.node_id for n in prefer_prefix_holder([a, b], {"attn-1": 512})]
    ['attn-1', 'attn-0']
    >>> [n.node_id for n in prefer_prefix_holder([a, NodeLoad("attn-1", running=9)], {"attn-1": 512})]
    ['attn-0', 'attn-1']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .selection import NodeLoad


@dataclass(frozen=True)
class PrefixPolicy:
    min_match_tokens: int = 32  # a shorter cached prefix saves too little prefill to leave the least-loaded node
    balance_abs: int = 4  # the holder may queue this many sequences more than the least-loaded node...
    balance_rel: float = 1.5  # ...or this many times as many; past both, load wins
    text_min_chars: int = 256  # text prompts shorter than this are not tokenized for matching (load only)


def leading_match(prompt_keys: Sequence[int], held: Container[int]) -> int:
    """How many leading blocks of a prompt (its chain keys, in order) are in ``held``."""
    n = 0
    for key in prompt_keys:
        if key not in held:
            break
        n += 1
    return n


def overloaded(load: NodeLoad, least: NodeLoad, policy: PrefixPolicy) -> bool:
    gap = load.queue - least.queue
    return gap > policy.balance_abs and load.queue > policy.balance_rel * least.queue


def prefer_prefix_holder(ranked: Sequence[NodeLoad], matched_tokens: Mapping[str, int],
                         policy: PrefixPolicy = PrefixPolicy()) -> list[NodeLoad]:
    """``ranked`` (load order) with the best prefix holder moved first, when one is worth it (module doc)."""
    known = [c for c in ranked if c.known]
    if not known:
        return list(ranked)
    least = known[0]
    best, best_tokens = None, 0
    for c in known:  # load order: on equal matches the less loaded wins
        tokens = matched_tokens.get(c.node_id, 0)
        if tokens >= policy.min_match_tokens and tokens > best_tokens and not overloaded(c, least, policy):
            best, best_tokens = c, tokens
    if best is None:
        return list(ranked)
    return [best] + [c for c in ranked if c is not best]


class NodePrefixes:
    """The chain keys the router takes one node to hold: its last Load reply's, and recently routed ones.

    Routed keys expire after ``ttl_s`` (by then the node's own report covers what it kept) and at most
    ``max_routed`` are kept, oldest dropped first.
    """

    def __init__(self, ttl_s: float = 30.0, max_routed: int = 65536):
        self.ttl_s, self.max_routed = ttl_s, max_routed
        self.block_size = 0  # unknown until the node's first Load reply
        self._reported: frozenset[int] = frozenset()
        self._routed: OrderedDict[int, float] = OrderedDict()  # key -> when it expires

    def report(self, keys: Iterable[int], block_size: int) -> None:
        self._reported = frozenset(keys)
        self.block_size = block_size

    def note(self, keys: Iterable[int], now: float) -> None:
        """The router just sent this node a prompt with these chain keys."""
        for key in keys:
            self._routed.pop(key, None)
            self._routed[key] = now + self.ttl_s
        while len(self._routed) > self.max_routed:
            self._routed.popitem(last=False)

    def matched_blocks(self, prompt_keys: Sequence[int], now: float) -> int:
        while self._routed:  # oldest first: drop the expired
            key, expires = next(iter(self._routed.items()))
            if expires > now:
                break
            del self._routed[key]
        return leading_match(prompt_keys, _Union(self._reported, self._routed))


class _Union:
    """Membership in either of two collections, without building a merged set per prompt."""

    def __init__(self, a: Collection[int], b: Collection[int]):
        self.a, self.b = a, b

    def __contains__(self, key: object) -> bool:
        return key in self.a or key in self.b
