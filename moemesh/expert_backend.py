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

The protocol is the backend's whole lifecycle, and the engine calls all of it:

- ``begin_step() -> generation`` and ``end_step()`` bracket each model run; a
  backend whose experts can move (the attention node's, which follows the
  placement) lets a new placement take effect only between them, so one step
  never mixes placements;
- ``wait_for_change(generation, timeout_s) -> bool``, after a step failed with
  :class:`ExpertBackendError`: True once a backend newer than ``generation`` is
  in place, so the engine re-runs the step on it; it may instead raise an
  ExpertBackendError at once when it knows no such backend can come (the
  attention node's, when no placement could host the missing experts);
- ``close()`` releases links, threads and channels.

:class:`StaticExpertBackend` is the base of backends whose experts never move
(local shards, a fixed placement): its step hooks do nothing and nothing ever
changes, so a failed step fails at once. Every method is abstract here, so a
backend lacking one cannot be instantiated.

Shapes: T rows, D hidden size, K experts per token.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Protocol, runtime_checkable

import torch

from moemesh.errors import MoemeshError


@runtime_checkable
class ExpertBackend(Protocol):
    @abstractmethod
    def dispatch(
        self,
        layer_id: int,
        x: torch.Tensor,  # [T, D] hidden states after the post-attention norm
        topk_idx: torch.Tensor,  # [T, K] int64 logical expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 gate weights (already scaled)
    ) -> Any:
        """Start computing the routed experts for these rows; return an opaque handle."""

    @abstractmethod
    def combine(self, handle: Any) -> torch.Tensor:
        """Wait for ``handle`` and return the weighted expert outputs, [T, D] in ``x``'s dtype."""

    @abstractmethod
    def begin_step(self) -> int:
        """A model run starts: no new placement takes effect until ``end_step``; return the current generation."""

    @abstractmethod
    def end_step(self) -> None:
        """The model run ended (well or not): a placement installed meanwhile may take effect."""

    @abstractmethod
    def wait_for_change(self, generation: int, timeout_s: float) -> bool:
        """Between steps: block until a backend newer than ``generation`` is in place (True) or ``timeout_s`` passes."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds (links, threads); no dispatch follows."""


class StaticExpertBackend(ExpertBackend):
    """Experts that never move between steps: the step hooks do nothing, and nothing ever changes."""

    def begin_step(self) -> int:
        return 0

    def end_step(self) -> None:
        pass

    def wait_for_change(self, generation: int, timeout_s: float) -> bool:
        return False  # no other backend will ever come: the failed step fails now, without waiting

    def close(self) -> None:
        pass


def require_backend(backend: object) -> ExpertBackend:
    """``backend``, checked at the wiring boundary: TypeError unless it implements the whole protocol."""
    if not isinstance(backend, ExpertBackend):
        raise TypeError(f"{type(backend).__name__} is not an ExpertBackend (dispatch, combine, begin_step, end_step, "
                        "wait_for_change, close): derive it from moemesh.expert_backend.StaticExpertBackend")
    return backend


class ExpertBackendError(MoemeshError, RuntimeError):
    """The routed experts could not be computed (for example, no node hosts them)."""
