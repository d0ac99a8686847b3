"""attn_node/experts/direct_replies.py: replies read in order by whoever waits, no reader thread."""

from __future__ import annotations

import pytest

from moemesh.attn_node.experts.direct_replies import UNREAD_LIMIT, DirectReplies, ReplyFuture


class Pair:
    def __init__(self, fail_at: int | None = None):
        self.read, self.failed_with, self.fail_at = [], None, fail_at
        self.futures = {}
        self.replies = DirectReplies(self.read_one, self.fail)

    def send(self, msg_id: int, reply_bytes: int = 100) -> ReplyFuture:
        fut = self.futures[msg_id] = ReplyFuture(self.replies, msg_id, 1, None, 1e18, 0.0, reply_bytes)
        self.replies.add(fut)
        return fut

    def read_one(self, fut):
        if fut.msg_id == self.fail_at:
            raise RuntimeError("peer closed")
        self.read.append(fut.msg_id)
        return f"rows {fut.msg_id}"

    def fail(self, reason):
        self.failed_with = reason
        for fut in self.replies.drain():  # as TorchPair.fail: unanswered messages resent (here: resolved)
            fut.set_result("over grpc")


def test_waiting_for_a_later_reply_reads_the_earlier_ones_on_the_way():
    pair = Pair()
    a, b, c = pair.send(0), pair.send(1), pair.send(2)
    assert b.result(timeout=1) == "rows 1" and pair.read == [0, 1]
    assert a.done() and a.result() == "rows 0" and not c.done()
    assert c.result(timeout=1) == "rows 2" and pair.read == [0, 1, 2]


def test_before_send_reads_what_is_due_only_when_the_buffers_could_fill():
    pair = Pair()
    pair.send(0, reply_bytes=1000)
    pair.replies.before_send(request_bytes=1000, reply_bytes=1000)
    assert pair.read == []  # small: the replies may wait in the socket
    pair.replies.before_send(request_bytes=1000, reply_bytes=UNREAD_LIMIT)
    assert pair.read == [0]
    pair.send(1)
    pair.replies.before_send(request_bytes=UNREAD_LIMIT + 1, reply_bytes=10)  # a large request
    assert pair.read == [0, 1]


def test_a_failed_read_fails_the_pair_and_waiters_get_the_resent_answer():
    pair = Pair(fail_at=1)
    a, b = pair.send(0), pair.send(1)
    assert b.result(timeout=1) == "over grpc" and a.result() == "rows 0"
    assert pair.failed_with == "peer closed" and pair.replies.failed


def test_a_wait_past_its_timeout_raises_timeout():
    from concurrent.futures import TimeoutError as FutureTimeout

    pair = Pair()
    fut = ReplyFuture(pair.replies)  # never sent: nothing due resolves it
    with pytest.raises(FutureTimeout):
        fut.result(timeout=0.01)


def test_a_future_resolved_by_another_thread_wakes_its_waiter_and_runs_its_callbacks():
    import threading

    pair = Pair()
    fut = ReplyFuture(pair.replies)  # nothing due: the waiter blocks until gRPC's thread answers
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    waiter_ready = threading.Event()

    def resolve():
        waiter_ready.wait(5)
        fut.set_result("over grpc")

    threading.Thread(target=resolve).start()
    waiter_ready.set()
    assert fut.result(timeout=5) == "over grpc" and seen == ["over grpc"]
    fut.add_done_callback(lambda f: seen.append("late"))  # a callback added once done runs at once
    assert seen == ["over grpc", "late"] and fut.exception() is None
    failed = ReplyFuture(pair.replies)
    failed.set_exception(ValueError("lost"))
    with pytest.raises(ValueError, match="lost"):
        failed.result(timeout=1)


def test_a_failing_callback_neither_fails_the_pair_nor_skips_the_others():
    pair = Pair()
    fut, later = pair.send(1), pair.send(2)
    seen = []

    def broken(f):
        raise RuntimeError("a caller's bug")

    fut.add_done_callback(broken)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert later.result(timeout=5) == "rows 2"  # reading reply 2 resolves 1 on the way, running its callbacks
    assert pair.failed_with is None and seen == ["rows 1"] and pair.read == [1, 2]


def test_a_reply_read_while_the_pair_fails_leaves_its_future_to_the_resend():
    """A future belongs to whoever takes it out of the queue: the pair's fail() drains the futures due (to resend
    them) while a reader is reading the first one's reply; that reader then resolves nothing, so the future is
    resolved once, by the resend, never twice (InvalidStateError) nor not at all."""
    pair = Pair()
    first, second = pair.send(0), pair.send(1)

    def read_then_the_pair_fails(fut):
        pair.fail("closed by the attention node")  # another thread's fail(), while this reply is read
        return f"rows {fut.msg_id}"

    pair.replies._read_one = read_then_the_pair_fails
    assert first.result(timeout=1) == "over grpc" and second.result(timeout=1) == "over grpc"
    assert pair.replies.drain() == []


def test_a_drain_on_another_thread_during_a_readers_take_leaves_every_future_owned_once():
    """fail() drains on its own thread while a reader takes the future whose reply it just read. Unguarded, the
    drain could pop the reader's head while the reader popped and put back the next future, which then nobody
    owned: never resent, never read (review). The reader's take is held open here until the drain has had its
    chance to run (it must wait), and every future ends resolved exactly once."""
    import collections
    import threading

    pair = Pair()
    first, second = pair.send(0), pair.send(1)
    drained = threading.Event()

    def drain_on_another_thread():
        pair.fail("closed by the attention node")
        drained.set()

    class HeldDeque(collections.deque):
        held = False

        def popleft(self):  # the reader's take (the first popleft): let the drain run now, if it can
            if not self.held:
                self.held = True
                threading.Thread(target=drain_on_another_thread).start()
                drained.wait(0.5)  # it cannot: the take holds the futures' ownership until it returns
            return super().popleft()

    pair.replies._due = HeldDeque(pair.replies._due)
    assert first.result(timeout=5) == "rows 0"
    assert drained.wait(5)
    assert second.result(timeout=5) == "over grpc"
    assert pair.read == [0] and pair.replies.drain() == []


def test_unread_bytes_are_what_was_sent_less_what_was_read():
    pair = Pair()
    pair.send(0, reply_bytes=UNREAD_LIMIT - 10)
    pair.replies.before_send(request_bytes=10, reply_bytes=10)
    assert pair.read == []  # exactly at the limit: the replies still fit
    pair.replies.before_send(request_bytes=10, reply_bytes=11)
    assert pair.read == [0]
    pair.send(1, reply_bytes=UNREAD_LIMIT - 10)  # the first's bytes were read: only this one's are unread
    pair.replies.before_send(request_bytes=10, reply_bytes=10)
    assert pair.read == [0]


def test_reply_rows_are_each_their_own_memory_and_large_ones_a_tensor_of_their_own():
    import torch

    from moemesh.attn_node.experts.direct_replies import SLAB_BYTES, ReplyRows

    rows = ReplyRows(hidden=16)
    taken = [rows.take(2, torch.float32) for _ in range(SLAB_BYTES // (2 * 16 * 4) + 3)]  # past one slab
    assert all(t.shape == (2, 16) and t.dtype == torch.float32 and t.is_contiguous() for t in taken)
    starts = {t.data_ptr() for t in taken}
    assert len(starts) == len(taken)  # no memory handed out twice, across slabs too
    for i, t in enumerate(taken):
        t.fill_(i)
    assert all(torch.equal(t, torch.full((2, 16), float(i))) for i, t in enumerate(taken))  # none overlaps another
    other = rows.take(2, torch.bfloat16)
    assert other.dtype == torch.bfloat16 and other.shape == (2, 16)
    big = rows.take(SLAB_BYTES // (16 * 4), torch.float32)  # a slab would hold one: it is its own tensor
    assert big.untyped_storage().nbytes() == big.numel() * 4
