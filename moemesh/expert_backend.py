"""The seam between model math and expert transport.

The MoE layer on an attention node knows nothing of where routed experts live.
It is handed an :class:`ExpertBackend` and, at every MoE layer, calls::

    handle = backend.dispatch(layer_id, x, topk_idx, topk_weights)   # start the routed experts
    shared = shared_experts(x)                                        # overlaps with them
    y = backend.combine(handle) + shared                              # wait and sum

``dispatch`` must not block on the experts' result (remote backends send and
return); ``combine`` returns, for every row of ``x``, the gate-weighted sum over
that row's top-k routed experts. Local, gRPC and torch.distributed backends
implement this protocol; the attention engine is built against it alone.

Shapes: T rows, D hidden size, K experts per token.

A backend whose experts can move (the attention node's, which follows the
placement) may also offer step hooks, which the engine calls when present:
``begin_step() -> generation`` and ``end_step()`` around each model run (a new
placement takes effect only between them), and ``wait_for_change(generation,
timeout_s) -> bool`` after a step failed with :class:`ExpertBackendError`:
True once a newer backend is in place, so the engine re-runs the step on it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from moemesh.errors import MoemeshError


@runtime_checkable
class ExpertBackend(Protocol):
    def dispatch(
        self,
        layer_id: int,
        x: torch.Tensor,  # [T, D] hidden states after the post-attention norm
        topk_idx: torch.Tensor,  # [T, K] int64 logical expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 gate weights (already scaled)
    ) -> Any:
        """Start computing the routed experts for these rows; return an opaque handle."""
        ...

    def combine(self, handle: Any) -> torch.Tensor:
        """Wait for ``handle`` and return the weighted expert outputs, [T, D] in ``x``'s dtype."""
        ...


class ExpertBackendError(MoemeshError, RuntimeError):
    """The routed experts could not be computed (for example, no node hosts them)."""
