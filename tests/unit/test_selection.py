"""Attention-node selection (pure): exact picks and orders."""

from __future__ import annotations

from moemesh.router.selection import NodeLoad, pick_node, rank_nodes


def L(node_id, running=0, waiting=0, free=100, total=100, known=True):
    return NodeLoad(node_id, running, waiting, free, total, known)


def ids(loads):
    return [x.node_id for x in loads]


def test_fewest_running_plus_waiting_first():
    nodes = [L("a", running=3), L("b", running=1, waiting=1), L("c", running=1)]
    assert pick_node(nodes).node_id == "c"
    assert ids(rank_nodes(nodes)) == ["c", "b", "a"]


def test_then_most_free_cache():
    nodes = [L("a", running=1, free=10), L("b", running=1, free=90), L("c", running=1, free=50)]
    assert ids(rank_nodes(nodes)) == ["b", "c", "a"]


def test_free_cache_in_tokens_not_fraction():
    nodes = [L("small", free=90, total=100), L("big", free=500, total=1000)]
    assert pick_node(nodes).node_id == "big"


def test_ties_break_by_node_id():
    nodes = [L("attn-2"), L("attn-0"), L("attn-1")]
    assert ids(rank_nodes(nodes)) == ["attn-0", "attn-1", "attn-2"]


def test_exclude_skips_tried_nodes():
    nodes = [L("a"), L("b", running=5), L("c", running=9)]
    assert pick_node(nodes, exclude={"a"}).node_id == "b"
    assert ids(rank_nodes(nodes, exclude={"a", "b"})) == ["c"]
    assert pick_node(nodes, exclude={"a", "b", "c"}) is None
    assert pick_node([]) is None


def test_unknown_loads_go_last_by_id():
    nodes = [L("z", known=False), L("a", known=False), L("m", running=50, free=0)]
    assert ids(rank_nodes(nodes)) == ["m", "a", "z"]


def test_queue_and_cache_free_fraction():
    x = L("a", running=2, waiting=3, free=25, total=100)
    assert (x.queue, x.cache_free) == (5, 0.25)
    assert NodeLoad("b").cache_free == 0.0
