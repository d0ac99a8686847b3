"""Per-client admission at the router: how many Generate streams each client may run and queue.

A Generate stream is *running* once the router forwards it to an attention node (the node runs it
or queues it), *queued* while it waits at the router for a running slot. The router runs at most
``max_running`` streams (``--max-inflight``) and each client at most ``max_running_per_client``;
past those a request waits, at most ``max_queued`` in all and ``max_queued_per_client`` per
client; past those it is refused (RESOURCE_EXHAUSTED, the message names the limit and its flag).
So one client flooding the router fills its own share, not the attention nodes' queues.

When a slot frees, the next request to run is the head of the queued client with the fewest
streams running; among those, the one served longest ago (then the oldest head): clients take
turns, FIFO within one client, so a client that queued much early does not go before one that
queued a little later.

:class:`Admission` is the pure bookkeeping (no I/O, no clock); :class:`AdmissionGate` puts it on
asyncio for the servicer; :func:`caller_key` says who the caller (:class:`Caller`) is.

    >>> a = Admission(max_running=2, max_queued=2, max_running_per_client=1, max_queued_per_client=1)
    >>> [a.admit(c).state for c in ("x", "x", "x", "y")]
    ['running', 'queued', 'rejected', 'running']
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import deque
from dataclasses import dataclass, field

# Sized for one default attention node (64 running + 256 waiting = 320): one client may use 3/4 of
# it, the others keep the rest. `moemesh up` scales the running share with its attention nodes.
DEFAULT_MAX_RUNNING_PER_CLIENT = 240
DEFAULT_MAX_QUEUED = 512  # requests waiting at the router for a running slot, all clients together
DEFAULT_MAX_QUEUED_PER_CLIENT = DEFAULT_MAX_QUEUED // 2  # half the router's queue

RUNNING, QUEUED, REJECTED, DONE = "running", "queued", "rejected", "done"
# Rejection reasons: the metrics label (bounded: never the client) and the flag that raises the limit.
CLIENT_LIMIT, ROUTER_LIMIT = "client_limit", "router_limit"
REASONS = (CLIENT_LIMIT, ROUTER_LIMIT)


@dataclass(eq=False)
class Ticket:
    """One Generate request's place: ``state`` moves queued -> running -> done (or rejected)."""

    client: str
    seq: int
    state: str = QUEUED
    reason: str | None = None  # why it was rejected (one of REASONS)
    message: str = ""  # the RESOURCE_EXHAUSTED details when rejected
    granted: asyncio.Future | None = field(default=None, repr=False)  # set by AdmissionGate


@dataclass
class _Client:
    running: int = 0
    queue: deque = field(default_factory=deque)  # its queued tickets, oldest first
    last_start: int = -1  # when it last got a running slot (a start count): who waited longest goes first


class Admission:
    """Per-client counters of running and queued requests; decides admit / queue / reject and who goes next."""

    def __init__(self, max_running: int = 512, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_running_per_client: int = DEFAULT_MAX_RUNNING_PER_CLIENT,
                 max_queued_per_client: int = DEFAULT_MAX_QUEUED_PER_CLIENT):
        for name, value, low in (("max_running", max_running, 1), ("max_queued", max_queued, 0),
                                 ("max_running_per_client", max_running_per_client, 1),
                                 ("max_queued_per_client", max_queued_per_client, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.max_running, self.max_queued = max_running, max_queued
        self.max_running_per_client, self.max_queued_per_client = max_running_per_client, max_queued_per_client
        self.running = self.queued = 0
        self._clients: dict[str, _Client] = {}
        self._seq = itertools.count()
        self._starts = itertools.count()

    def clients(self) -> int:
        """Clients with a request running or queued (the rest are forgotten: no per-client state leaks)."""
        return len(self._clients)

    def counts(self, client: str) -> tuple[int, int]:
        """(running, queued) of one client."""
        c = self._clients.get(client)
        return (0, 0) if c is None else (c.running, len(c.queue))

    def admit(self, client: str) -> Ticket:
        """A new request of ``client``: a running, queued or rejected ticket."""
        ticket = Ticket(client, next(self._seq))
        c = self._clients.get(client) or _Client()
        if self.running < self.max_running and c.running < self.max_running_per_client:
            # Nobody queued can run now (release() runs every queued request it can), so this is fair.
            self._clients[client] = c
            self._start(ticket, c)
            return ticket
        if len(c.queue) >= self.max_queued_per_client:
            return self._reject(ticket, CLIENT_LIMIT, (
                f"this client already has {c.running} generation(s) running and {len(c.queue)} waiting at the "
                f"router, its limits (--max-running-per-client {self.max_running_per_client}, "
                f"--max-queued-per-client {self.max_queued_per_client}): retry when one finishes, or ask the "
                "operator to raise --max-queued-per-client or --max-running-per-client"))
        if self.queued >= self.max_queued:
            return self._reject(ticket, ROUTER_LIMIT, (
                f"the router has {self.running} generation(s) running (--max-inflight {self.max_running}) and "
                f"{self.queued} waiting (--max-queued {self.max_queued}): retry later, or ask the operator to "
                "raise --max-queued or --max-inflight (or add a router)"))
        self._clients[client] = c
        c.queue.append(ticket)
        self.queued += 1
        return ticket

    def release(self, ticket: Ticket) -> list[Ticket]:
        """``ticket`` is over (finished, failed, cancelled, client gone), whatever its state; idempotent.

        Returns the queued tickets that now run, in the order they were picked.
        """
        c = self._clients.get(ticket.client)
        if ticket.state == QUEUED and c is not None:
            c.queue.remove(ticket)
            self.queued -= 1
        elif ticket.state == RUNNING and c is not None:
            c.running -= 1
            self.running -= 1
        ticket.state = DONE if ticket.state != REJECTED else REJECTED
        if c is not None and not c.running and not c.queue:
            del self._clients[ticket.client]
        return self._grant()

    def _grant(self) -> list[Ticket]:
        granted = []
        while self.running < self.max_running:
            ready = [c for c in self._clients.values() if c.queue and c.running < self.max_running_per_client]
            if not ready:
                break
            c = min(ready, key=lambda c: (c.running, c.last_start, c.queue[0].seq))
            ticket = c.queue.popleft()
            self.queued -= 1
            self._start(ticket, c)
            granted.append(ticket)
        return granted

    def _start(self, ticket: Ticket, c: _Client) -> None:
        ticket.state = RUNNING
        c.last_start = next(self._starts)
        c.running += 1
        self.running += 1

    @staticmethod
    def _reject(ticket: Ticket, reason: str, message: str) -> Ticket:
        ticket.state, ticket.reason, ticket.message = REJECTED, reason, message
        return ticket


class AdmissionGate:
    """:class:`Admission` for asyncio handlers (one event loop): ``await wait(ticket)`` until it runs."""

    def __init__(self, admission: Admission):
        self.admission = admission

    def admit(self, client: str) -> Ticket:
        ticket = self.admission.admit(client)
        if ticket.state == QUEUED:
            ticket.granted = asyncio.get_running_loop().create_future()
        return ticket

    async def wait(self, ticket: Ticket, timeout_s: float | None) -> None:
        """Until ``ticket`` runs; TimeoutError after ``timeout_s`` (it stays queued: the caller releases it)."""
        if ticket.state == QUEUED:
            await asyncio.wait_for(asyncio.shield(ticket.granted), timeout_s)

    def release(self, ticket: Ticket) -> None:
        for granted in self.admission.release(ticket):
            if granted.granted is not None and not granted.granted.done():
                granted.granted.set_result(None)


def _host(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` -> ``ipv4:127.0.0.1``: a new connection (new port) is the same client."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


@dataclass(frozen=True)
class Caller:
    """Who is calling, as any door sees it: the ``authorization`` value it sent (never logged), the
    identities in its peer certificate (mTLS), and its address (``ipv4:HOST:PORT``, ``ipv6:[HOST]:PORT``)."""

    authorization: str | bytes | None = None
    identities: tuple[str, ...] = ()
    peer: str = ""

    def __repr__(self) -> str:  # never the credential
        return f"Caller(identities={self.identities!r}, peer={self.peer!r})"


def grpc_caller(context) -> Caller:
    """The caller of a gRPC call (its invocation metadata, peer certificate and address)."""
    given = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
    identities = tuple(i.decode(errors="replace") if isinstance(i, bytes) else i
                       for i in context.peer_identities() or ())
    return Caller(given, identities, context.peer() or "")


def caller_key(caller: Caller, *, tokens_checked: bool) -> str:
    """Who is calling, for per-client limits: never a secret, never logged.

    The bearer token's fingerprint when the router checks tokens (``tokens_checked``: an unchecked
    token would let a client pick a new identity per request); else the peer certificate's identity
    (mTLS); else the peer's address without its port. The same caller gets the same key through
    either door (gRPC or HTTP). One function, so a role/identity model can replace it.
    """
    if tokens_checked and caller.authorization:
        given = caller.authorization
        raw = given.encode() if isinstance(given, str) else given
        return "token:" + hashlib.sha256(raw).hexdigest()[:32]
    if caller.identities:
        return "cert:" + ",".join(sorted(caller.identities))
    return "peer:" + _host(caller.peer)

