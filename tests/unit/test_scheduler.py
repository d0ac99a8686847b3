"""Scheduler: decode-first continuous batching, token budget and chunked prefill, FCFS admission over the cache."""

from __future__ import annotations

import itertools

import pytest

from moemesh.attn_node.block_manager import BlockManager
from moemesh.attn_node.scheduler import SampledToken, Scheduler, SchedulerConfig, finish_reason
from moemesh.attn_node.sequence import Sequence, Status
from moemesh.sampling import SamplingParams

_arrivals = itertools.count()


def make_seq(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), next(_arrivals))


def make_sched(max_num_seqs=8, max_num_batched_tokens=8, num_blocks=64, block_size=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), BlockManager(num_blocks, block_size))


def step(sched: Scheduler) -> list[tuple[str, int, bool]]:
    """Schedule one step and apply it as the engine does; return (name, num_tokens, samples) per item."""
    items = sched.schedule()
    out = [(it.seq.request_id, it.num_tokens, it.samples) for it in items]
    for it in items:
        assert it.num_tokens >= 1
        assert it.seq.num_cached + it.num_tokens <= it.seq.num_tokens
    sampling = [it.seq for it in items if it.samples]
    for it in items:
        it.seq.num_cached += it.num_tokens
    for seq in sampling:
        seq.output_ids.append(7)
    return out


def test_long_prompt_is_chunked_across_steps():
    sched = make_sched(max_num_batched_tokens=8)
    a = make_seq("a", 20)
    sched.add(a)
    assert step(sched) == [("a", 8, False)]
    assert a.status is Status.RUNNING
    assert step(sched) == [("a", 8, False)]
    assert step(sched) == [("a", 4, True)]  # the chunk that reaches the end of the prompt samples
    assert a.output_ids == [7]
    assert step(sched) == [("a", 1, True)]  # then one token per step
    assert a.num_cached == 21


def test_decodes_come_before_prefill_chunks():
    sched = make_sched(max_num_batched_tokens=8)
    a = make_seq("a", 4)
    sched.add(a)
    assert step(sched) == [("a", 4, True)]
    b = make_seq("b", 20)
    sched.add(b)
    # a decodes first; b gets what is left of the budget.
    assert step(sched) == [("a", 1, True), ("b", 7, False)]
    assert step(sched) == [("a", 1, True), ("b", 7, False)]
    assert step(sched) == [("a", 1, True), ("b", 6, True)]
    assert step(sched) == [("a", 1, True), ("b", 1, True)]


def test_running_prefill_comes_before_admitting_new_requests():
    sched = make_sched(max_num_batched_tokens=8)
    a, b = make_seq("a", 20), make_seq("b", 3)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 8, False)]  # budget spent: b is not admitted
    assert list(sched.waiting) == [b]
    assert step(sched) == [("a", 8, False)]
    assert step(sched) == [("a", 4, True), ("b", 3, True)]
    assert step(sched) == [("a", 1, True), ("b", 1, True)]


def test_budget_is_never_exceeded_and_everything_completes():
    sched = make_sched(max_num_seqs=4, max_num_batched_tokens=5)
    seqs = [make_seq(f"s{i}", n, max_tokens=3) for i, n in enumerate([3, 9, 1, 6, 2, 11])]
    for s in seqs:
        sched.add(s)
    for _ in range(100):
        if not sched.has_work():
            break
        out = step(sched)
        assert 0 < sum(n for _, n, _ in out) <= 5
        assert len({name for name, _, _ in out}) == len(out)  # a sequence appears once per step
        assert len(sched.running) <= 4
        for s in list(sched.running):
            if len(s.output_ids) == s.params.max_tokens:
                sched.finish(s, "length")
    assert not sched.has_work()
    assert all(len(s.output_ids) == 3 and s.status is Status.FINISHED for s in seqs)
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_budget_caps_decodes_too():
    sched = make_sched(max_num_batched_tokens=2)
    seqs = [make_seq(f"s{i}", 1) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert step(sched) == [("s0", 1, True), ("s1", 1, True)]
    assert step(sched) == [("s0", 1, True), ("s1", 1, True)]


def test_fcfs_admission_stops_at_first_request_that_does_not_fit():
    # 4 blocks of 4 tokens. A needs 6 + 5 - 1 = 10 tokens (3 blocks), B needs 8 (2 blocks),
    # C needs 2 (1 block): C would fit next to A but must not jump B.
    sched = make_sched(max_num_batched_tokens=64, num_blocks=4, block_size=4)
    a, b, c = make_seq("a", 6, max_tokens=5), make_seq("b", 6, max_tokens=3), make_seq("c", 2, max_tokens=1)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [("a", 6, True)]
    assert list(sched.waiting) == [b, c]
    assert sched.blocks.num_free == 1
    assert step(sched) == [("a", 1, True)]
    assert list(sched.waiting) == [b, c]
    sched.finish(a, "length")
    assert sched.blocks.num_free == 4
    assert a.status is Status.FINISHED and a.finish_reason == "length"
    assert step(sched) == [("b", 6, True), ("c", 2, True)]
    assert not sched.waiting
    assert sched.blocks.num_free == 1


def test_admission_reserves_the_whole_request():
    sched = make_sched(num_blocks=16, block_size=4)
    a = make_seq("a", 5, max_tokens=8)  # 12 tokens of cache -> 3 blocks
    sched.add(a)
    step(sched)
    assert len(a.block_table) == 3
    assert sched.blocks.num_free == 13


def test_max_num_seqs():
    sched = make_sched(max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 3), make_seq("b", 3), make_seq("c", 3)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [("a", 3, True), ("b", 3, True)]
    assert list(sched.waiting) == [c]
    assert step(sched) == [("a", 1, True), ("b", 1, True)]
    sched.finish(a, "stop")
    assert sched.running == [b]
    assert step(sched) == [("b", 1, True), ("c", 3, True)]


def test_finish_frees_blocks_so_a_waiting_request_gets_in():
    sched = make_sched(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    a, b = make_seq("a", 5, max_tokens=4), make_seq("b", 5, max_tokens=4)  # 8 tokens each: the whole cache
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 5, True)]
    assert step(sched) == [("a", 1, True)]
    assert sched.blocks.num_free == 0
    assert list(sched.waiting) == [b]
    sched.finish(a, "length")
    assert sched.has_work()
    assert step(sched) == [("b", 5, True)]
    sched.finish(b, "stop")
    assert not sched.has_work()
    assert sched.blocks.num_free == 2
    assert step(sched) == []


def test_finish_a_waiting_request():
    sched = make_sched(num_blocks=2, block_size=4)
    a, b = make_seq("a", 5, max_tokens=4), make_seq("b", 5, max_tokens=4)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(b, "abort")
    assert not sched.waiting
    assert b.status is Status.FINISHED and b.finish_reason == "abort"
    assert sched.running == [a]


def test_samples_flag():
    sched = make_sched(max_num_batched_tokens=5)
    a = make_seq("a", 10)
    sched.add(a)
    (first,) = sched.schedule()
    assert (first.num_tokens, first.samples) == (5, False)  # chunk ends mid-prompt
    a.num_cached += 5
    (second,) = sched.schedule()
    assert (second.num_tokens, second.samples) == (5, True)  # chunk ends at the end of the prompt


# ---- postprocess: applying a step that ran ------------------------------------

EOS = 50


def seq_with(max_tokens=4, stop=(), ignore_eos=False, outputs=()) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop, ignore_eos=ignore_eos)
    seq = Sequence("s", [1, 2, 3], params, next(_arrivals))
    seq.output_ids.extend(outputs)
    return seq


@pytest.mark.parametrize(
    "kw, token, want",
    [
        ({}, 7, None),
        ({}, EOS, "stop"),
        ({"ignore_eos": True}, EOS, None),
        ({"stop": (9,)}, 9, "stop"),
        ({"stop": (9,), "ignore_eos": True}, 9, "stop"),  # ignore_eos ignores EOS only
        ({"max_tokens": 3, "outputs": (5, 6)}, 7, "length"),
        ({"max_tokens": 3, "outputs": (5, 6)}, EOS, "stop"),  # a stop on the last allowed token is a stop
        ({"max_tokens": 3, "outputs": (5, 6), "ignore_eos": True}, EOS, "length"),
        ({"max_tokens": 3, "outputs": (5,)}, 7, None),
    ],
)
def test_finish_reason(kw, token, want):
    seq = seq_with(**kw)
    seq.output_ids.append(token)  # as postprocess does, before asking
    assert finish_reason(seq, token, (EOS, 51)) == want


def test_postprocess_advances_appends_and_finishes_exactly():
    sched = Scheduler(SchedulerConfig(8, 15, eos_token_ids=(EOS,)), BlockManager(64, 4))
    a = make_seq("a", 3, max_tokens=2)  # ends by length on its second token
    b = make_seq("b", 10, max_tokens=5)  # a chunk that stops mid-prompt: no token
    c = Sequence("c", [4, 5], SamplingParams(max_tokens=5), next(_arrivals))  # ends by EOS
    d = Sequence("d", [4, 5], SamplingParams(max_tokens=5, ignore_eos=True), next(_arrivals))  # goes on past EOS
    for s in (a, c, d, b):
        sched.add(s)
    items = sched.schedule()
    assert [(it.seq.request_id, it.num_tokens, it.samples) for it in items] == [
        ("a", 3, True), ("c", 2, True), ("d", 2, True), ("b", 8, False)]
    out = sched.postprocess(items, [11, EOS, EOS])
    assert out == [SampledToken(a, 11, None), SampledToken(c, EOS, "stop"), SampledToken(d, EOS, None)]
    assert [(s.num_cached, s.output_ids, s.status) for s in (a, b, c, d)] == [
        (3, [11], Status.RUNNING), (8, [], Status.RUNNING), (2, [EOS], Status.FINISHED), (2, [EOS], Status.RUNNING)]
    assert c.finish_reason == "stop" and c.block_table == [] and sched.running == [a, d, b]

    items = sched.schedule()
    assert [(it.seq.request_id, it.num_tokens, it.samples) for it in items] == [
        ("a", 1, True), ("d", 1, True), ("b", 2, True)]
    out = sched.postprocess(items, [12, 13, 14])
    assert out == [SampledToken(a, 12, "length"), SampledToken(d, 13, None), SampledToken(b, 14, None)]
    assert a.status is Status.FINISHED and a.finish_reason == "length" and a.output_ids == [11, 12]
    assert sched.running == [d, b]
    blocks_in_use = sum(len(s.block_table) for s in (b, d))
    assert sched.blocks.num_free == sched.blocks.num_blocks - blocks_in_use


def test_postprocess_refuses_a_token_count_that_does_not_match_the_step():
    sched = make_sched()
    sched.add(make_seq("a", 3))
    items = sched.schedule()
    with pytest.raises(ValueError, match="2 sampled tokens for 1"):
        sched.postprocess(items, [1, 2])
    assert items[0].seq.num_cached == 0  # nothing applied
