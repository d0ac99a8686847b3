"""The in-process expert backend: routed experts computed by an ExpertShard in this process.

This is what makes the single-process engine: the attention engine wired to a
shard that holds every expert. ``dispatch`` computes eagerly (there is nothing
to overlap with on one CPU stream), ``combine`` hands the result back. Its
experts never move, so the step hooks are the static base's no-ops. The ids come
from the model's own gate, so the shard skips validating them (on a GPU that
check would be a host sync per layer).
"""

from __future__ import annotations

import torch

from moemesh.expert_backend import ExpertBackendError, StaticExpertBackend

from .shard import ExpertShard


class LocalExpertBackend(StaticExpertBackend):
    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def dispatch(self, layer_id: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        if self.shard.hosted_mask(layer_id) is None:
            raise ExpertBackendError(f"no experts of MoE layer {layer_id} are loaded in this process")
        return self.shard.forward(layer_id, x, topk_idx, topk_weights, validate=False)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
