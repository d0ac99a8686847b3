"""Per-client admission at the router (router/admission.py): event sequences -> exact decisions."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from moemesh.router.admission import (
    CLIENT_LIMIT, QUEUED, REJECTED, ROUTER_LIMIT, RUNNING, Admission, AdmissionGate, caller_key, grpc_caller,
)


def play(admission: Admission, events: list[str]) -> list[str]:
    """Run ``"+x"`` (client x asks) / ``"-x1"`` (x's request 1, by arrival among x's, ends) events.

    Returns one line per event: the new ticket's state (and reason), or which tickets started running.
    """
    tickets: dict[str, list] = {}
    out = []
    for event in events:
        client = event[1]
        if event[0] == "+":
            t = admission.admit(client)
            tickets.setdefault(client, []).append(t)
            out.append(f"{client}{len(tickets[client])} {t.state}" + (f" {t.reason}" if t.reason else ""))
        else:
            t = tickets[client][int(event[2:]) - 1]
            granted = admission.release(t)
            names = [f"{g.client}{tickets[g.client].index(g) + 1}" for g in granted]
            out.append(f"{event[1:]} done -> {' '.join(names) or '-'}")
    return out


def test_per_client_limits_queue_then_reject_while_others_run():
    a = Admission(max_running=4, max_queued=4, max_running_per_client=2, max_queued_per_client=1)
    assert play(a, ["+a", "+a", "+a", "+a", "+b", "+b", "+b", "+a"]) == [
        "a1 running", "a2 running", "a3 queued", "a4 rejected client_limit",
        "b1 running", "b2 running", "b3 queued", "a5 rejected client_limit"]
    assert (a.running, a.queued, a.counts("a"), a.counts("b")) == (4, 2, (2, 1), (2, 1))


def test_router_queue_full_is_router_limit():
    a = Admission(max_running=1, max_queued=1, max_running_per_client=1, max_queued_per_client=5)
    assert play(a, ["+a", "+b", "+c"]) == ["a1 running", "b1 queued", "c1 rejected router_limit"]


def test_a_freed_slot_goes_to_the_client_with_fewest_running():
    # a floods first; b and c queue later, yet each takes the next free slot before a's second queued request.
    a = Admission(max_running=3, max_queued=10, max_running_per_client=3, max_queued_per_client=10)
    assert play(a, ["+a", "+a", "+a", "+a", "+a", "+b", "+c", "-a1", "-a2", "-a3", "-b1", "-c1"]) == [
        "a1 running", "a2 running", "a3 running", "a4 queued", "a5 queued", "b1 queued", "c1 queued",
        "a1 done -> b1",  # a has 2 running, b and c 0 and never served: the older head (b1) goes
        "a2 done -> c1",  # a has 1 running, c 0
        "a3 done -> a4",  # only a is waiting
        "b1 done -> a5",
        "c1 done -> -"]
    assert (a.running, a.queued, a.clients()) == (2, 0, 1)


def test_equal_clients_take_turns():
    a = Admission(max_running=1, max_queued=10, max_running_per_client=1, max_queued_per_client=10)
    events = ["+a", "+a", "+a", "+b", "+b", "-a1", "-b1", "-a2", "-b2", "-a3"]
    assert play(a, events) == [
        "a1 running", "a2 queued", "a3 queued", "b1 queued", "b2 queued",
        "a1 done -> b1",  # both at 0 running: b was never served, though a2 is older than b1
        "b1 done -> a2",
        "a2 done -> b2",
        "b2 done -> a3",
        "a3 done -> -"]
    assert (a.running, a.queued, a.clients()) == (0, 0, 0)


def test_per_client_running_limit_holds_with_free_router_slots():
    a = Admission(max_running=10, max_queued=10, max_running_per_client=1, max_queued_per_client=2)
    assert play(a, ["+a", "+a", "+b", "-a1", "-a2"]) == [
        "a1 running", "a2 queued", "b1 running", "a1 done -> a2", "a2 done -> -"]


def test_release_of_queued_or_rejected_or_twice_frees_nothing_else():
    a = Admission(max_running=1, max_queued=1, max_running_per_client=1, max_queued_per_client=1)
    first, queued = a.admit("a"), a.admit("b")
    rejected = a.admit("c")
    assert (first.state, queued.state, rejected.state) == (RUNNING, QUEUED, REJECTED)
    assert a.release(queued) == [] and a.counts("b") == (0, 0)  # cancelled while queued
    assert a.release(rejected) == [] and a.release(queued) == []
    assert (a.running, a.queued) == (1, 0)
    assert a.release(first) == [] and a.release(first) == []  # twice: still nothing below zero
    assert (a.running, a.queued, a.clients()) == (0, 0, 0)


def test_rejection_messages_name_the_limit_and_the_flag():
    a = Admission(max_running=1, max_queued=0, max_running_per_client=1, max_queued_per_client=0)
    a.admit("a")
    mine = a.admit("a")
    assert (mine.reason, mine.message) == (CLIENT_LIMIT, (
        "this client already has 1 generation(s) running and 0 waiting at the router, its limits "
        "(--max-running-per-client 1, --max-queued-per-client 0): retry when one finishes, or ask the operator "
        "to raise --max-queued-per-client or --max-running-per-client"))
    a = Admission(max_running=1, max_queued=0, max_running_per_client=1, max_queued_per_client=1)
    a.admit("a")
    other = a.admit("b")
    assert (other.reason, other.message) == (ROUTER_LIMIT, (
        "the router has 1 generation(s) running (--max-inflight 1) and 0 waiting (--max-queued 0): retry later, "
        "or ask the operator to raise --max-queued or --max-inflight (or add a router)"))


@pytest.mark.parametrize("kw", [dict(max_running=0), dict(max_queued=-1), dict(max_running_per_client=0),
                                dict(max_queued_per_client=1.5)])
def test_bad_limits_are_value_errors(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Admission(**kw)


def test_gate_wakes_the_granted_and_releases_a_cancelled_waiter():
    async def scenario():
        gate = AdmissionGate(Admission(max_running=1, max_queued=5, max_running_per_client=1,
                                       max_queued_per_client=5))
        first, second, third = gate.admit("a"), gate.admit("b"), gate.admit("c")
        waiting_b = asyncio.ensure_future(gate.wait(second, None))
        waiting_c = asyncio.ensure_future(gate.wait(third, None))
        await asyncio.sleep(0)
        waiting_b.cancel()  # b's client leaves while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting_b
        gate.release(second)  # what the servicer does on cancellation
        gate.release(first)
        await asyncio.wait_for(waiting_c, 5)
        with pytest.raises(asyncio.TimeoutError):
            await gate.wait(gate.admit("d"), 0.01)  # c runs: d's deadline passes while queued
        return gate.admission, third

    admission, third = asyncio.run(scenario())
    assert third.state == RUNNING
    assert (admission.running, admission.queued, admission.counts("b")) == (1, 1, (0, 0))


class FakeContext:
    def __init__(self, metadata=(), identities=None, peer="ipv4:127.0.0.1:40000"):
        self._metadata, self._identities, self._peer = metadata, identities, peer

    def invocation_metadata(self):
        return self._metadata

    def peer_identities(self):
        return self._identities

    def peer(self):
        return self._peer


def test_client_key_is_the_token_fingerprint_then_certificate_then_host():
    bearer = (("authorization", "Bearer tok-a"),)
    key = caller_key(grpc_caller(FakeContext(bearer)), tokens_checked=True)
    assert key == "token:" + hashlib.sha256(b"Bearer tok-a").hexdigest()[:32] and "tok-a" not in key
    assert key != caller_key(grpc_caller(FakeContext((("authorization", "Bearer tok-b"),))), tokens_checked=True)
    cert = FakeContext(bearer, identities=[b"spiffe://moemesh/client/b", b"client-b"])
    assert caller_key(grpc_caller(cert), tokens_checked=False) == "cert:client-b,spiffe://moemesh/client/b"
    # unchecked tokens do not name the client; a new connection (port) is the same client
    assert caller_key(grpc_caller(FakeContext(bearer)), tokens_checked=False) == "peer:ipv4:127.0.0.1"
    assert caller_key(grpc_caller(FakeContext(peer="ipv4:127.0.0.1:40001")), tokens_checked=True) == "peer:ipv4:127.0.0.1"
    assert caller_key(grpc_caller(FakeContext(peer="ipv6:[::1]:5000")), tokens_checked=False) == "peer:ipv6:[::1]"
    assert caller_key(grpc_caller(FakeContext(peer="unix:/tmp/s")), tokens_checked=False) == "peer:unix:/tmp/s"


def test_tokens_file_holds_one_token_per_client(tmp_path):
    from moemesh.router.auth import read_tokens_file, router_authenticator
    from moemesh.wire.tls import SecurityConfigError

    path = tmp_path / "tokens"
    path.write_text("# clients\ntok-a\n\n  tok-b  \n")
    assert read_tokens_file(path) == ("tok-a", "tok-b")
    book = router_authenticator(None, read_tokens_file(path)).tokens
    assert [book.lookup(t) for t in ("tok-a", "tok-b", "tok-c")] == ["client", "client", None]
    for bad in ("", "# only a comment\n", "tok a\n"):
        path.write_text(bad)
        with pytest.raises(SecurityConfigError, match="empty|one token per line"):
            read_tokens_file(path)
