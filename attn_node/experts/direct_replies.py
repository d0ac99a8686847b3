"""Replies read by the thread that waits for them: the ``tcp`` pair backend's receive side, no reader thread.

With gloo, a reader thread waits for each reply and resolves its future, which wakes the engine thread:
two wake-ups per hop besides the expert node's, each a scheduler round trip on a busy machine. Over the
plain TCP stream (moemesh/wire/p2p_socket.py) the engine thread, waiting in ``combine`` on a
:class:`ReplyFuture`, reads the replies itself, in frame order, until its own has come (replies of
earlier messages it meets resolve their futures on the way). One reader at a time (a lock).

Nothing reads while nobody waits, so unread replies stay in the socket buffers. Both ends block in a
send only when those buffers are full, which would be a deadlock if each waited to send before it
read; :meth:`DirectReplies.before_send` prevents it: before a message that is large, or that would bring
the unread replies past :data:`UNREAD_LIMIT`, the sender reads every reply due first (large steps then
lose micro-batch overlap on this backend; decode-sized ones keep it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from moemesh.logs import get_logger

log = get_logger("moemesh.attn_node.replies")

UNREAD_LIMIT = 64 << 10  # bytes of unread replies (and of one request) that loopback socket buffers always hold


class ReplyFuture:
    """A future whose ``result`` reads replies from the pair until it is resolved.

    The part of :class:`concurrent.futures.Future` the backend and the links use (``result``, ``done``,
    ``exception``, ``add_done_callback``, ``set_result``, ``set_exception``), without a Condition per message:
    the waiter usually resolves its own future while reading, so nothing needs waking. Only when another thread
    resolves it (gRPC, after the pair failed) does a waiter block, on an Event made for it then."""

    __slots__ = ("_replies", "_done", "_result", "_exception", "_callbacks", "_event", "msg_id", "rows", "dtype",
                 "deadline", "sent_at", "reply_size", "args")

    def __init__(self, replies: DirectReplies, msg_id: int = -1, rows: int = 0, dtype=None, deadline: float = 0.0,
                 sent_at: float = 0.0, reply_size: int = 0, args: tuple = ()):
        self._replies = replies
        self._done = False
        self._result = self._exception = None
        self._callbacks: list | None = None
        self._event: threading.Event | None = None
        # what its reader needs (the pair's entry for the message: no tuple, no dict of pending messages beside it),
        # and its send arguments, for a resend over gRPC if the pair fails first
        self.msg_id, self.rows, self.dtype, self.deadline, self.sent_at = msg_id, rows, dtype, deadline, sent_at
        self.reply_size, self.args = reply_size, args

    def done(self) -> bool:
        return self._done

    def set_result(self, value) -> None:
        self._finish(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(None, exc)

    def _finish(self, value, exc) -> None:
        with _RESOLVE:
            if self._done:
                raise InvalidStateError("the reply's future is resolved already")
            self._result, self._exception, self._done = value, exc, True
            event, callbacks = self._event, self._callbacks
        if event is not None:
            event.set()
        for fn in callbacks or ():
            self._call(fn)

    def _call(self, fn) -> None:
        """A done-callback; one that raises is logged, as concurrent.futures does: it must not fail the pair
        (whose reader resolves this future) nor keep the other callbacks from running."""
        try:
            fn(self)
        except Exception:
            log.exception("reply_callback_failed")

    def add_done_callback(self, fn) -> None:
        with _RESOLVE:
            if not self._done:
                self._callbacks = [*(self._callbacks or ()), fn]
                return
        self._call(fn)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._done:
            self._replies.read_until(self, deadline)
        if not self._done:  # resent over gRPC when the pair failed: wait for that answer
            with _RESOLVE:
                if not self._done and self._event is None:
                    self._event = threading.Event()
                event = self._event
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._done and not event.wait(left):
                raise FutureTimeout()

    def result(self, timeout: float | None = None):
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exception


_RESOLVE = threading.Lock()  # a future's state and its waiter's Event (held for a few assignments)


class DirectReplies:
    """The messages due on one pair, as their futures in frame order; ``read_one(fut)`` (the pair's) reads the
    reply of the first and returns its value, which resolves it.

    ``read_one`` raises to say the pair failed; the pair's ``fail`` then takes every unanswered future
    (:meth:`drain`) to resend it, and every waiter falls back to its future (resolved by gRPC). A future belongs
    to whoever takes it out of the deque: the reader that read its reply, or a ``drain``; so a reply read while
    the pair fails resolves its future only if no ``drain`` took it first. Taking (the reader's pop and check,
    a drain's whole sweep) holds ``_owners``, so a drain never interleaves with a reader's take (it could
    otherwise pop the reader's head while the reader popped and put back the next future, which neither would
    then own). One sender (the pair's lock) and one reader (``_lock``) at a time: each keeps its own byte
    count."""

    def __init__(self, read_one, fail):
        self._read_one, self._fail = read_one, fail
        self._due: deque = deque()  # futures of the messages sent and not answered, in frame order
        self._sent_bytes = self._read_bytes = 0  # of the replies due so far, and of those read (unread: the gap)
        self._lock = threading.Lock()  # one reader at a time
        self._owners = threading.Lock()  # taking futures out of _due (uncontended but for a failure)
        self.failed = False

    def add(self, fut: ReplyFuture) -> None:
        """A message sent (by the one sender): its reply is due after the others'."""
        self._sent_bytes += fut.reply_size
        self._due.append(fut)

    def drain(self) -> list[ReplyFuture]:
        """Take every future due (the pair failed: they are resent); a reader mid-read then resolves none of them."""
        with self._owners:
            taken = list(self._due)
            self._due.clear()
        return taken

    def before_send(self, request_bytes: int, reply_bytes: int) -> None:
        """Read every reply due first when this message could fill the buffers (see the module doc)."""
        if self._due and (request_bytes > UNREAD_LIMIT or
                          self._sent_bytes - self._read_bytes + reply_bytes > UNREAD_LIMIT):
            self.read_until(None, None)

    def read_until(self, fut: Future | None, deadline: float | None) -> None:
        """Read replies in order until ``fut`` is done (None: until none is due), or the pair fails."""
        while not self.failed and (fut is None or not fut.done()):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not self._lock.acquire(timeout=-1 if left is None else left):
                return
            try:
                if fut is not None and fut.done():  # another waiter read it meanwhile
                    return
                try:
                    head = self._due[0]
                except IndexError:
                    return
                try:
                    value = self._read_one(head)
                except Exception as exc:  # P2PError: the pair is done; its fail() resends what is unanswered
                    self.failed = True
                    self._fail(str(exc))
                    return
                self._read_bytes += head.reply_size
                if self._take(head):
                    head.set_result(value)
            finally:
                self._lock.release()

    def _take(self, head: ReplyFuture) -> bool:
        """Whether the reader still owns ``head`` (no drain took it meanwhile), taking it out of the deque."""
        with self._owners:
            if not self._due or self._due[0] is not head:  # drained: the pair failed, and its fail() resends head
                return False
            self._due.popleft()
            return True


_HOST = torch.device("cpu")  # the tcp stream's replies land in host memory; the backend moves them on
SLAB_BYTES = 64 << 10  # one allocation for the rows of this many bytes of small replies (at least SLAB_MIN of them)
SLAB_MIN = 4


class ReplyRows:
    """The tensors replies' rows are copied into (one per reply, the caller's to keep), cut from slabs.

    ``torch.empty`` costs 1-2 us, a tenth of a decode hop's budget; a slab of n replies' rows made at once and
    split with ``unbind`` costs a fraction of that per reply. Each reply gets rows of its own (a slab's memory
    is never handed out twice); a slab is freed once every reply cut from it is (so a reply kept holds its 64 KiB
    slab). Replies larger than
    ``SLAB_BYTES / SLAB_MIN`` get a tensor of their own. One reader at a time (DirectReplies' lock)."""

    def __init__(self, hidden: int):
        self.hidden = hidden
        self._left: dict = {}  # (rows, dtype) -> an iterator over the unused rows of its current slab

    def take(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized [rows, hidden] host tensor of ``dtype``."""
        if rows == 0:
            return torch.empty((0, self.hidden), dtype=dtype, device=_HOST)
        key = (rows, dtype)
        left = self._left.get(key)
        if left is not None:
            got = next(left, None)
            if got is not None:
                return got
        n = SLAB_BYTES // max(1, rows * self.hidden * dtype.itemsize)
        if n < SLAB_MIN:
            return torch.empty((rows, self.hidden), dtype=dtype, device=_HOST)
        if len(self._left) >= 8:  # a few shapes at a time (decode steps repeat theirs): forget the others' slabs
            self._left.clear()
        left = self._left[key] = iter(torch.empty((n, rows, self.hidden), dtype=dtype, device=_HOST).unbind(0))
        return next(left)

