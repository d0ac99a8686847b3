"""Routed-token counts per (MoE layer, expert) over a sliding window: the load statistic for placement.

The MoE gate adds each step's top-k choices, counted on the model's device (an ``index_add_`` into
a fixed [E] row: no host read in the step); the router reads a snapshot through the AttentionNode
Load RPC, the only time the counts come to the host. Time is cut into buckets; the window is the last ``buckets``
of them, so old traffic ages out without per-token timestamps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class LoadStats:
    def __init__(self, moe_layers: tuple[int, ...], n_experts: int, window_s: float = 60.0, buckets: int = 6,
                 clock: Callable[[], float] = time.monotonic, device: torch.device | str = "cpu"):
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be > 0 and buckets >= 1")
        self.moe_layers, self.n_experts = moe_layers, n_experts
        self.window_s, self.bucket_s, self._clock = window_s, window_s / buckets, clock
        self._row = {layer: i for i, layer in enumerate(moe_layers)}
        self._counts = torch.zeros(buckets, len(moe_layers), n_experts, dtype=torch.int64, device=device)  # [B, L, E]
        self._stamp = [-1] * buckets  # which time bucket each slot holds
        self._lock = threading.Lock()

    def _slot(self, now: float) -> int:
        tick = int(now // self.bucket_s)
        slot = tick % len(self._stamp)
        if self._stamp[slot] != tick:  # a new bucket replaces the one a whole window old
            self._counts[slot].zero_()
            self._stamp[slot] = tick
        return slot

    def add(self, layer: int, topk_idx: torch.Tensor) -> None:
        """Count one step's routed assignments of a MoE layer ([T, K] expert ids, -1 ignored)."""
        ids = topk_idx.reshape(-1)  # [T * K]
        # Not bincount(ids[ids >= 0]): both sizes depend on the data, a host sync on a GPU. -1 adds 0 to expert 0.
        ones = (ids >= 0).to(self._counts.dtype)  # [T * K]
        with self._lock:
            row = self._counts[self._slot(self._clock()), self._row[layer]]  # [E], a view
            row.index_add_(0, ids.clamp(min=0), ones)

    def snapshot(self) -> dict[int, list[int]]:
        """{MoE layer: tokens routed to each expert within the window}."""
        with self._lock:
            now_tick = int(self._clock() // self.bucket_s)
            live = [i for i, t in enumerate(self._stamp) if t >= 0 and now_tick - t < len(self._stamp)]
            total = self._counts[live].sum(dim=0) if live else torch.zeros_like(self._counts[0])  # [L, E]
        total = total.tolist()  # the host read, only when the planner asks
        return {layer: total[i] for layer, i in self._row.items()}
