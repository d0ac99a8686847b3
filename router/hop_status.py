"""Dispatch hops per expert node in ClusterStatus: the attention nodes' Load summaries, merged per node.

Each attention node times its hops to each expert node over its last window (``LoadResponse.expert_hops``,
attn_node/experts/hop_stats.py). Several attention nodes see one expert node: its ``hop_p50_us`` and
``compute_p50_us`` are their medians weighted by samples, its ``hop_p99_us`` the worst one (a tail seen by
any attention node is a tail of the mesh). A node whose p99 is :data:`STRAGGLER_RATIO` times its peers' median
p99 or more, over a window with enough hops on both sides, is flagged ``hop_straggler`` (:func:`stragglers`).
:func:`merge_hops` and :func:`stragglers` are pure; :func:`fill_hops` reads the summaries through the
pool's load cache (``AttentionPool.expert_hops``: no Load call of its own) and writes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moemesh.v1 import attention_pb2


@dataclass(frozen=True)
class NodeHops:
    samples: int
    hop_p50_us: float
    hop_p99_us: float
    compute_p50_us: float


def merge_hops(reports: Iterable[Iterable[attention_pb2.ExpertHops]]) -> dict[str, NodeHops]:
    """Per expert node address, the merged summaries of every attention node's report (one iterable each)."""
    parts: dict[str, list] = {}
    for report in reports:
        for h in report:
            if h.samples:
                parts.setdefault(h.address, []).append(h)
    out = {}
    for address, hs in parts.items():
        n = sum(h.samples for h in hs)
        out[address] = NodeHops(n, sum(h.hop_p50_us * h.samples for h in hs) / n, max(h.hop_p99_us for h in hs),
                                sum(h.compute_p50_us * h.samples for h in hs) / n)
    return out


STRAGGLER_RATIO = 3.0  # p99 this many times the peers' median p99: "well above", not noise between equals
MIN_SAMPLES = 50  # hops in the window before a node's p99 means anything (a p99 of fewer is its maximum)


def stragglers(merged: dict[str, NodeHops], ratio: float = STRAGGLER_RATIO, min_samples: int = MIN_SAMPLES
               ) -> set[str]:
    """The nodes whose hop p99 is at least ``ratio`` times the median p99 of the other nodes with enough hops
    (none without such a peer to compare with)."""
    known = {a: h.hop_p99_us for a, h in merged.items() if h.samples >= min_samples}
    slow = set()
    for address, p99 in known.items():
        peers = sorted(v for a, v in known.items() if a != address)
        if not peers:
            continue
        mid = len(peers) // 2
        median = peers[mid] if len(peers) % 2 else (peers[mid - 1] + peers[mid]) / 2
        if p99 >= ratio * median:
            slow.add(address)
    return slow


async def gather_hops(pool, attn_records) -> dict[str, NodeHops]:
    """Every attention node's hop summaries (its Load reply, through the pool's load cache), merged per expert
    node address; a node that does not answer adds nothing."""
    return merge_hops(await pool.expert_hops(attn_records))


async def straggler_ids(pool, attn_records, expert_records) -> set[str]:
    """The ids of the expert nodes the attention nodes see as stragglers (the leader gives them less)."""
    slow = stragglers(await gather_hops(pool, attn_records))
    return {r.id for r in expert_records if r.address in slow}


async def fill_hops(pool, attn_records, nodes) -> None:
    """The attention nodes' hop summaries, written into the expert ``nodes`` (NodeStatus)."""
    merged = await gather_hops(pool, attn_records)
    slow = stragglers(merged)
    for status in nodes:
        hops = merged.get(status.address) if status.role == "expert" else None
        if hops is not None:
            status.hop_samples, status.hop_p50_us = hops.samples, hops.hop_p50_us
            status.hop_p99_us, status.compute_p50_us = hops.hop_p99_us, hops.compute_p50_us
            status.hop_straggler = status.address in slow
