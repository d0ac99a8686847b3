"""Prefix-aware routing: the pure scoring (router/prefix_match.py) and the pool's use of it (router/pool.py)."""

from __future__ import annotations

import asyncio

from moemesh.control.records import NodeRecord
from moemesh.prefix_hash import block_hashes
from moemesh.router.pool import AttentionPool
from moemesh.router.prefix_match import NodePrefixes, PrefixPolicy, leading_match, overloaded, prefer_prefix_holder
from moemesh.router.selection import NodeLoad
from moemesh.v1 import attention_pb2, inference_pb2

POLICY = PrefixPolicy(min_match_tokens=32, balance_abs=4, balance_rel=1.5)


def L(node_id, running=0, waiting=0, known=True):
    return NodeLoad(node_id, running, waiting, 100, 100, known)


def ids(loads):
    return [x.node_id for x in loads]


# ---- scoring -------------------------------------------------------------------------


def test_leading_match_counts_only_the_unbroken_start():
    assert leading_match([1, 2, 3, 4], {1, 2, 4}) == 2
    assert leading_match([1, 2], set()) == 0
    assert leading_match([], {1}) == 0
    assert leading_match([5, 1], {1}) == 0


def test_the_longest_holder_goes_first_the_rest_keep_load_order():
    order = [L("a"), L("b", running=1), L("c", running=2), L("d", running=3)]
    got = prefer_prefix_holder(order, {"b": 64, "c": 128, "d": 16}, POLICY)
    assert ids(got) == ["c", "a", "b", "d"]


def test_no_holder_or_a_short_match_leaves_load_order():
    order = [L("a"), L("b", running=1)]
    assert ids(prefer_prefix_holder(order, {}, POLICY)) == ["a", "b"]
    assert ids(prefer_prefix_holder(order, {"b": 31}, POLICY)) == ["a", "b"]  # below min_match_tokens
    assert ids(prefer_prefix_holder(order, {"b": 32}, POLICY)) == ["b", "a"]


def test_equal_matches_go_to_the_less_loaded():
    order = [L("a", running=1), L("b", running=2)]
    assert ids(prefer_prefix_holder(order, {"a": 64, "b": 64}, POLICY)) == ["a", "b"]


def test_load_wins_when_the_holder_is_overloaded():
    least = L("a", running=2)
    # Overloaded needs both: more than 4 sequences more AND more than 1.5x the least loaded.
    assert not overloaded(L("b", running=6), least, POLICY)  # gap 4: not more than 4
    assert overloaded(L("b", running=7), least, POLICY)  # gap 5, 7 > 3
    assert not overloaded(L("b", running=12), L("a", running=8), POLICY)  # gap 4
    assert not overloaded(L("b", running=13), L("a", running=9), POLICY)  # gap 4
    assert overloaded(L("b", running=20), L("a", running=13), POLICY)  # gap 7, 20 > 19.5
    assert not overloaded(L("b", running=19), L("a", running=13), POLICY)  # gap 6, 19 < 19.5
    order = [least, L("b", running=7)]
    assert ids(prefer_prefix_holder(order, {"b": 1000}, POLICY)) == ["a", "b"]
    order = [least, L("b", running=6)]
    assert ids(prefer_prefix_holder(order, {"b": 1000}, POLICY)) == ["b", "a"]


def test_an_overloaded_longest_holder_yields_to_a_shorter_one():
    order = [L("a"), L("b", running=1), L("c", running=9)]
    assert ids(prefer_prefix_holder(order, {"b": 64, "c": 512}, POLICY)) == ["b", "a", "c"]


def test_unknown_loads_are_never_preferred():
    order = [L("a"), L("b", known=False)]
    assert ids(prefer_prefix_holder(order, {"b": 512}, POLICY)) == ["a", "b"]
    assert ids(prefer_prefix_holder([L("b", known=False)], {"b": 512}, POLICY)) == ["b"]


def test_node_prefixes_merge_reported_and_routed_keys_until_they_expire():
    held = NodePrefixes(ttl_s=10.0, max_routed=3)
    held.report([1, 2], block_size=16)
    assert held.block_size == 16
    assert held.matched_blocks([1, 2, 3], now=0.0) == 2
    held.note([3, 4], now=0.0)
    assert held.matched_blocks([1, 2, 3, 4, 5], now=5.0) == 4
    assert held.matched_blocks([1, 2, 3, 4, 5], now=10.0) == 2  # routed keys expired; reported ones stay
    held.note([7, 8, 9, 10], now=20.0)  # at most 3 routed keys: the oldest (7) is dropped
    assert held.matched_blocks([7], now=21.0) == 0
    assert held.matched_blocks([8, 9, 10], now=21.0) == 3
    held.report([], block_size=16)
    assert held.matched_blocks([1], now=21.0) == 0


# ---- the pool --------------------------------------------------------------------------


class FakeView:
    def __init__(self, records):
        self._records = records

    def ready_attention_nodes(self):
        return list(self._records)

    def records(self, role=None):
        return list(self._records)


class FakeStub:
    def __init__(self, load: attention_pb2.LoadResponse, tokens: dict[str, list[int]]):
        self.load, self.tokens, self.tokenized = load, tokens, []

    async def Load(self, request, timeout=None):
        return self.load

    async def Tokenize(self, request, timeout=None):
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        self.tokenized.append((request.text, add))
        return inference_pb2.TokenizeResponse(token_ids=self.tokens[request.text, add])


def make_pool(loads: dict[str, attention_pb2.LoadResponse], tokens=None):
    records = [NodeRecord(node_id, "attn", f"127.0.0.1:{i + 1}", "ready") for i, node_id in enumerate(loads)]
    pool = AttentionPool(FakeView(records), load_max_age_s=0.0)
    stubs = {node_id: FakeStub(load, tokens or {}) for node_id, load in loads.items()}
    pool.stub = lambda record: stubs[record.id]
    return pool, stubs


def generate(ids=None, text=None, rid="r", add_special=None):
    req = inference_pb2.GenerateRequest(request_id=rid)
    if ids is not None:
        req.token_ids.ids.extend(ids)
    if text is not None:
        req.text = text
    if add_special is not None:
        req.add_special_tokens = add_special
    return req


PROMPT = list(range(100, 180))  # 5 blocks of 16


def test_pool_ranks_the_holder_of_a_token_prompt_first_and_notes_where_it_sent_it():
    async def main():
        held = attention_pb2.LoadResponse(running=2, block_size=16, prefix_hashes=block_hashes(PROMPT, 16)[:3],
                                          cache_total_tokens=100)
        idle = attention_pb2.LoadResponse(running=0, block_size=16, cache_total_tokens=100)
        pool, _ = make_pool({"attn-0": idle, "attn-1": held})
        assert ids(load for _, load in await pool.ranked()) == ["attn-0", "attn-1"]  # no request: load order
        order = await pool.ranked(request=generate(PROMPT + [1, 2]))
        assert ids(load for _, load in order) == ["attn-1", "attn-0"]
        other = list(range(500, 580))
        first = await pool.ranked(request=generate(other, rid="x"))
        assert ids(load for _, load in first) == ["attn-0", "attn-1"]
        # attn-0 was chosen for `other`: the next prompt sharing it follows before attn-0 reports it.
        again = await pool.ranked(request=generate(other + [3], rid="y"))
        assert ids(load for _, load in again) == ["attn-0", "attn-1"]
        pool.streams["attn-0"] = 3  # attn-0 busier now, still not overloaded (gap 1)
        again = await pool.ranked(request=generate(other + [4], rid="z"))
        assert ids(load for _, load in again) == ["attn-0", "attn-1"]
        assert (order[0][1].prompt_tokens, order[0][1].cached_blocks) == (0, 0)

    asyncio.run(main())


def test_pool_tokenizes_long_text_once_per_request_with_the_requests_special_tokens():
    text = "x" * 300
    async def main():
        bos = 1
        held = attention_pb2.LoadResponse(running=3, block_size=16, prefix_hashes=block_hashes(PROMPT, 16),
                                          cache_total_tokens=100)
        idle = attention_pb2.LoadResponse(running=0, block_size=16, cache_total_tokens=100)
        # Tokenize adds a BOS unless asked not to: the node caches [BOS] + PROMPT for plain text, PROMPT for
        # add_special_tokens=false (chat text, whose template wrote its own BOS).
        pool, stubs = make_pool({"attn-0": idle, "attn-1": held}, {(text, True): [bos] + PROMPT, (text, False): PROMPT})
        plain = await pool.ranked(request=generate(text=text, rid="a"))
        assert ids(load for _, load in plain) == ["attn-0", "attn-1"]  # [BOS] + PROMPT matches nothing held
        chat = await pool.ranked(request=generate(text=text, rid="b", add_special=False))
        assert ids(load for _, load in chat) == ["attn-1", "attn-0"]
        again = await pool.ranked(exclude={"attn-1"}, request=generate(text=text, rid="b", add_special=False))
        assert ids(load for _, load in again) == ["attn-0"]
        assert stubs["attn-0"].tokenized == [(text, True), (text, False)]  # request b tokenized once
        short = await pool.ranked(request=generate(text="x" * 10, rid="c"))
        assert ids(load for _, load in short) == ["attn-0", "attn-1"]
        assert stubs["attn-0"].tokenized == [(text, True), (text, False)]  # short text is not tokenized

    asyncio.run(main())


def test_pool_without_a_prefix_policy_ranks_by_load():
    async def main():
        held = attention_pb2.LoadResponse(running=2, block_size=16, prefix_hashes=block_hashes(PROMPT, 16))
        pool, _ = make_pool({"attn-0": attention_pb2.LoadResponse(), "attn-1": held})
        pool.prefix_policy = None
        assert ids(load for _, load in await pool.ranked(request=generate(PROMPT))) == ["attn-0", "attn-1"]

    asyncio.run(main())
