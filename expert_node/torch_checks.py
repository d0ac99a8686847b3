"""The expert node's per-message bookkeeping on the torch transport's tcp stream (expert_node/torch_server.py).

:class:`FrameChecks`: the tables the C receive checks an inline request against (p2p_native.c
``mm_serve``: the layer hosted here, dtype, hidden, k, lengths, ids, weights), kept in step with the
shard; :class:`Tally`: Prometheus counts added up per session; :class:`Zeros`: reply rows for messages with no
work here; :class:`Hosted`: a snapshot's mask address for the C row checks.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moemesh.wire import p2p
from moemesh.wire.codec import dtype_to_proto

from .server import HIDDEN_DTYPES, MESSAGES_OK, DispatchService, count_tokens


class Zeros:
    """Zero-filled reply rows by size (a few sizes, small ones kept: decode steps repeat theirs)."""

    KEEP_BYTES, KEEP_SIZES = 1 << 20, 8

    def __init__(self):
        self._by_size: dict[int, torch.Tensor] = {}

    def of(self, nbytes: int) -> torch.Tensor:
        got = self._by_size.get(nbytes)
        if got is None:
            got = torch.zeros(nbytes, dtype=torch.uint8)
            if nbytes <= self.KEEP_BYTES:
                if len(self._by_size) >= self.KEEP_SIZES:
                    self._by_size.clear()
                self._by_size[nbytes] = got
        return got


class Hosted:
    """The address of a layer snapshot's ``hosted`` mask [E] bool, for the C checks (kept while it is used)."""

    def __init__(self):
        self._snapshot = self._mask = None
        self._address = 0

    def address(self, snapshot) -> int:
        if snapshot is not self._snapshot:  # a new placement or a reload: look it up once
            self._mask = np.ascontiguousarray(snapshot.hosted, dtype=np.bool_)
            self._snapshot, self._address = snapshot, self._mask.ctypes.data
        return self._address


TALLY_S = 0.5  # how stale the node's Prometheus message and token counts may get while it serves a stream


class Tally:
    """Messages and routed tokens per (layer, expert), added up per session and published to Prometheus in
    batches: a counter's ``inc`` costs about a microsecond, and a decode message touches up to K experts per row.
    Info's ``tokens_computed`` is counted at once (it is one integer). Each layer's counts are one int64 [E]
    array for the session's life (the C reply adds to it in place once a reply is sent; publishing zeroes it)."""

    def __init__(self, svc: DispatchService):
        self.svc = svc
        self.n = svc.cfg.n_routed_experts
        self.messages = 0
        self.tokens: dict[int, np.ndarray] = {}  # layer -> counts per expert not yet published
        self._addresses: dict[int, int] = {}  # layer -> its counts' address
        self.since = time.monotonic()

    def add(self, layer: int, ids: np.ndarray) -> None:
        routed = ids[ids >= 0]
        if routed.size:
            self.counts(layer)[:] += np.bincount(routed, minlength=self.n)
        self.counted(int(routed.size))

    def counts(self, layer: int) -> np.ndarray:
        held = self.tokens.get(layer)
        if held is None:
            held = self.tokens[layer] = np.zeros(self.n, dtype=np.int64)
        return held

    def counts_address(self, layer: int) -> int:
        """Where the C reply adds ``layer``'s routed ids once sent (p2p_native.c mm_reply); looked up once per layer
        (numpy's ``ctypes.data`` costs microseconds, and :meth:`flush` zeroes the table in place)."""
        address = self._addresses.get(layer)
        if address is None:
            address = self._addresses[layer] = self.counts(layer).ctypes.data
        return address

    def counted(self, routed: int) -> None:
        """One message of ``routed`` (token, expert) assignments, its counts added already."""
        self.messages += 1
        self.svc.tokens_computed += routed
        if time.monotonic() - self.since >= TALLY_S:
            self.flush()

    def flush(self) -> None:
        if self.messages:
            MESSAGES_OK.inc(self.messages)
        for layer, counts in self.tokens.items():
            if counts.any():
                count_tokens(layer, counts)
                counts[:] = 0
        self.messages, self.since = 0, time.monotonic()


class FrameChecks:
    """What the C receive checks an inline request against, as ``args`` for ``SocketPair.recv_checked``.

    Built from the shard's layer snapshots; the node compares the snapshot it computes with against
    ``snapshots[layer]`` on every message (one identity test) and calls :meth:`refresh` when the shard changed.
    """

    def __init__(self, svc: DispatchService, inline_bytes: int):
        cfg = svc.cfg
        self.svc = svc
        self.limits = np.array([cfg.hidden_size, cfg.num_experts_per_tok, p2p.MAX_BODY_BYTES, inline_bytes,
                                cfg.n_routed_experts], dtype=np.int64)
        self.itemsize = np.zeros(16, dtype=np.int64)  # by dtype code; 0: a dtype the node does not take
        for dtype in HIDDEN_DTYPES:
            self.itemsize[dtype_to_proto(dtype)] = dtype.itemsize
        self.n_layers = cfg.num_hidden_layers
        self.hosted = np.zeros(self.n_layers, dtype=np.uint64)  # per layer: its mask's address, 0 = none here
        self.snapshots: list = [None] * self.n_layers
        self._masks: list = [None] * self.n_layers  # the masks the addresses point into, kept alive
        self.refresh()

    def refresh(self) -> None:
        shard = self.svc.shard
        for layer in range(self.n_layers):
            snapshot = shard.snapshot(layer)
            mask = None if snapshot is None else np.ascontiguousarray(snapshot.hosted, dtype=np.bool_)
            self.snapshots[layer], self._masks[layer] = snapshot, mask
            self.hosted[layer] = 0 if mask is None else mask.ctypes.data
        self.args = (self.limits.ctypes.data, self.itemsize.ctypes.data, self.hosted.ctypes.data, self.n_layers)
