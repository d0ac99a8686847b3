"""Dispatch hops per expert node, as this attention node times them: Prometheus histograms and a sliding window.

A hop is one message's round trip: ``send()`` called -> reply decoded, on this node's clock. The
expert node reports in the reply what it spent by its own clock (``DispatchResponse.receive_ns``,
``compute_ns``, ``send_ns``; the torch frame's reply prefix carries the same three): no clock is
shared, so the two network legs are not told apart; what the node did not account for is the
*transport* (both legs plus this side's framing): ``hop - receive - compute - send``.

Every hop goes to the process's :data:`HOPS` window at once, which the Load reply summarizes per node
(``hop_p50_us``, ``hop_p99_us``, ``compute_p50_us``: ``moemesh status --json`` shows them), and to
``moemesh_dispatch_{hop,node_receive,compute,node_send,transport}_seconds{node=...}`` in batches: five
histogram observations cost over ten microseconds on a busy box, more than the rest of a decode hop's
Python on the torch transport, so the thread that took the reply only appends the hop to its recorder,
and the process's flusher thread publishes every recorder's hops each :data:`FLUSH_S` seconds, as does a
summary of the window (a Load call: the router's load poll, every few seconds) or a link's close. The
histograms lag the hops by at most about :data:`FLUSH_S`; the window and its totals never lag.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np

from moemesh import metrics
from moemesh.logs import get_logger

DEFAULT_WINDOW_S = 60.0
MAX_SAMPLES = 4096  # per node: enough for a p99, bounded memory at any rate
FLUSH_S = 1.0  # how often the flusher thread publishes the hops recorded since (seconds)


@dataclass(frozen=True)
class HopSummary:
    address: str
    samples: int
    hop_p50_us: float
    hop_p99_us: float
    compute_p50_us: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values`` (sorted or not); 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class HopWindow:
    """Per expert node address, (time, hop seconds, compute seconds) of the last ``window_s`` seconds.

    Thread-safe: reader threads of every link record, the gRPC service summarizes."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_samples: int = MAX_SAMPLES, clock=time.monotonic):
        self.window_s, self.max_samples, self.clock = window_s, max_samples, clock
        self._hops: dict[str, deque] = {}
        self._lock = threading.Lock()
        self.recorders: weakref.WeakSet = weakref.WeakSet()  # flushed by summaries()
        self._totals = (0.0, 0.0, 0)  # every hop ever recorded: (hop seconds, compute seconds, hops)

    def record(self, address: str, hop_s: float, compute_s: float) -> None:
        now = self.clock()
        with self._lock:
            hops = self._hops.get(address)
            if hops is None:
                hops = self._hops[address] = deque(maxlen=self.max_samples)
            hops.append((now, hop_s, compute_s))
            hop_total, compute_total, count = self._totals
            self._totals = (hop_total + hop_s, compute_total + compute_s, count + 1)

    def totals(self) -> tuple[float, float, int]:
        """(hop seconds, expert compute seconds, hops) over every hop recorded, at once (the histograms lag:
        they are published in batches); ``--micro-batches auto`` reads its per-step deltas from here."""
        with self._lock:
            return self._totals

    def add_recorder(self, recorder: "HopRecorder") -> None:
        with self._lock:  # links are made on placement changes while a Load call may be summarizing
            self.recorders.add(recorder)

    def summaries(self) -> list[HopSummary]:
        """One summary per node with hops in the window, by address; nodes silent for a window are forgotten."""
        with self._lock:
            recorders = list(self.recorders)
        for recorder in recorders:
            recorder.flush()
        cutoff = self.clock() - self.window_s
        out = []
        with self._lock:
            for address in sorted(self._hops):
                hops = self._hops[address]
                while hops and hops[0][0] < cutoff:
                    hops.popleft()
                if not hops:
                    del self._hops[address]
                    continue
                snapshot = list(hops)  # at most MAX_SAMPLES: sorting it under the lock is cheap
                hop_us = [h * 1e6 for _, h, _ in snapshot]
                compute_us = [c * 1e6 for _, _, c in snapshot]
                out.append(HopSummary(address, len(snapshot), percentile(hop_us, 50), percentile(hop_us, 99),
                                      percentile(compute_us, 50)))
        return out


log = get_logger("moemesh.attn_node.hops")
HOPS = HopWindow()  # the process's: links come and go with placement versions, a node's history stays
_WINDOWS: weakref.WeakSet = weakref.WeakSet()  # windows with recorders: the flusher's
_flusher: list[threading.Thread] = []
_flusher_lock = threading.Lock()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_S)
        flush_all()


def flush_all() -> None:
    """Publish every recorder's pending hops (the flusher's round)."""
    for window in list(_WINDOWS):
        with window._lock:
            recorders = list(window.recorders)
        for recorder in recorders:
            try:
                recorder.flush()
            except Exception:  # one recorder's failure must not end the publishing of every other's
                log.exception("hop_histograms_flush_failed", node=recorder.address)


def _start_flusher(window: HopWindow) -> None:
    _WINDOWS.add(window)
    with _flusher_lock:
        if not _flusher:
            _flusher.append(threading.Thread(target=_flush_forever, name="hop-flusher", daemon=True))
            _flusher[0].start()


class HopRecorder:
    """One link's recorder: its node's Prometheus children looked up once (a labels() call costs microseconds)."""

    def __init__(self, address: str, window: HopWindow | None = None):
        self.address = address
        self.window = HOPS if window is None else window
        self._pending: deque = deque()  # hops not yet in the histograms (appended by one reader, drained by flush)
        self._lock = threading.Lock()  # one flush at a time
        self._hop = metrics.DISPATCH_HOP.labels(address)
        self._receive = metrics.DISPATCH_NODE_RECEIVE.labels(address)
        self._compute = metrics.DISPATCH_COMPUTE.labels(address)
        self._send = metrics.DISPATCH_NODE_SEND.labels(address)
        self._transport = metrics.DISPATCH_TRANSPORT.labels(address)
        # last: from here the flusher may flush this recorder
        self.window.add_recorder(self)
        _start_flusher(self.window)

    def record(self, hop_s: float, receive_ns: int, compute_ns: int, send_ns: int) -> None:
        """On the thread that took the reply: the window at once, the histograms by the flusher."""
        self.window.record(self.address, hop_s, compute_ns * 1e-9)
        self._pending.append((hop_s, receive_ns, compute_ns, send_ns))  # atomic: no lock on the reply's thread

    def flush(self) -> None:
        """Publish the hops recorded since the last flush to the histograms (a few numpy passes per histogram,
        whatever their number: :func:`observe_many`)."""
        with self._lock:
            pending = [self._pending.popleft() for _ in range(len(self._pending))]  # those here now; later ones wait
        if not pending:
            return
        hops = np.array(pending, dtype=np.float64)  # [n, 4]: hop seconds, then the node's three durations in ns
        hop_s = hops[:, 0]
        node_s = hops[:, 1:] * 1e-9
        observe_many(self._hop, hop_s)
        observe_many(self._receive, node_s[:, 0])
        observe_many(self._compute, node_s[:, 1])
        observe_many(self._send, node_s[:, 2])
        # a node clock running fast could report more than the hop: the transport is then 0, never negative
        observe_many(self._transport, np.maximum(0.0, hop_s - node_s.sum(axis=1)))


def observe_many(child, values: np.ndarray) -> None:
    """``child.observe(v)`` for every ``v`` of ``values`` (a histogram child), in a few calls: thousands of hops a
    second, five histograms each, cost a core's tenth in ``observe`` calls, holding the GIL the engine thread
    needs. prometheus_client keeps a child's buckets as one counter per upper bound, each counting the values
    that fell in it (cumulated only when scraped), and the sum: one ``searchsorted`` gives every value's bucket
    (the first bound >= it: ``observe``'s), each bucket's counter and the sum are added to once. A client without
    those fields gets one ``observe`` per value."""
    bounds, buckets, total = (getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values.tolist():
            child.observe(value)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left"),
                         minlength=len(bounds))
    for i in np.flatnonzero(counts[:len(bounds)]).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(values.sum()))
