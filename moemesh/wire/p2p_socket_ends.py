"""The end of a tcp pair stream (p2p_socket.SocketPair): calls in flight on its descriptors, and close().

A call in flight (a C loop, a blocked recv) holds its descriptor's number: closed under it, the number could be
reused by a new socket that the call then reads or writes. So close() shuts the stream down at once (a blocked
call on either end returns) but leaves the descriptors open while a call is in flight; the call in flight
releases them when it returns. One call per direction at a time (the callers' order): a flag each, set before
the call reads its descriptor, ordered by the GIL.

A call whose descriptor was read before its flag was set (an argument, a grown send scratch) must not run after
a close() in between: the flag is set, then ``_closed`` read; close() does it the other way round. Such a call
answers its ``refused`` value instead (the C calls: -EBADF, as on a closed descriptor); the Python path's calls
use the socket objects, which fail on their own once closed (``refused`` None: the call always runs).
"""

from __future__ import annotations

import socket
import threading


SEND, RECV = 0, 1  # the two directions' calls in flight


class StreamEnds:
    """Base of SocketPair: ``sock`` (receives) and ``_out`` (sends) over one connection, closed once."""

    sock: socket.socket
    _out: socket.socket

    def _init_ends(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()  # send, receive and fail() threads may all close
        self._busy = [False, False]  # a call on the descriptors in flight: [SEND], [RECV]

    def _held(self, side: int, refused, fn, *args):
        """``fn(*args)`` as ``side``'s (SEND or RECV) call in flight; ``refused`` (not None) if the pair closed
        first. The last call in flight of a closed pair releases its descriptors."""
        busy = self._busy
        busy[side] = True
        try:
            if refused is not None and self._closed:
                return refused
            return fn(*args)
        finally:
            busy[side] = False
            if self._closed and not busy[1 - side]:
                self._release()

    def _mark_closed(self) -> None:
        """Under the close lock, once: what later calls must see (the C blocks' descriptors: SocketPair's)."""

    def close(self) -> None:
        """End the stream: shut down at once (a blocked call on either end returns) and the descriptors marked -1
        for later calls; closed now when no call is in flight, else by the one in flight when it returns."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._mark_closed()
            idle = not (self._busy[SEND] or self._busy[RECV])
        try:  # wakes a thread blocked in recv/sendmsg (its descriptor stays open until it has returned)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if idle:
            self._release()

    def _release(self) -> None:
        self._out.close()  # both idempotent
        self.sock.close()

    def __del__(self):  # the pair code drops its groups by reference, as with gloo's
        try:
            self.close()
        except Exception:  # at interpreter exit the modules it uses may be gone already; the OS closes the fds
            pass
