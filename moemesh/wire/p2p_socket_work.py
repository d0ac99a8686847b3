"""The tcp pair's process-group work objects (p2p_socket.py): a receive read when it is waited for, and the one
done work every send returns (a tcp send is complete when it returns)."""

from __future__ import annotations

import datetime

import torch


class SocketWork:
    """A receive posted into ``buf``; the read happens in ``wait`` (on the waiting thread: no hand-off)."""

    def __init__(self, pair, buf: torch.Tensor | None):
        self.pair, self.buf = pair, buf
        self._done = buf is None
        self.nbytes: int | None = None  # the message's length, once received

    def is_completed(self) -> bool:
        return self._done

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if not self._done:
            self.nbytes = self.pair._read_into(self.buf, None if timeout is None else timeout.total_seconds())
            self._done = True
        return True


SENT = SocketWork(None, None)  # every send is complete when it returns: one shared, done work
