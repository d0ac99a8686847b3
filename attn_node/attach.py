"""Wiring a plain :class:`Transformer` to its routed experts, from outside the model.

The model file builds every MoE layer without a backend (it knows nothing of
transport); the code that chose the transport attaches one, as gpt-fast's
``tp.py`` applies tensor parallelism to a plain single-device model. The same
backend is then handed to the :class:`~moemesh.attn_node.engine.Engine`, which
brackets each step with its hooks.
"""

from __future__ import annotations

from moemesh.expert_backend import ExpertBackend, require_backend

from .load_stats import LoadStats
from .model import Transformer


def attach_experts(model: Transformer, backend: ExpertBackend, stats: LoadStats | None = None) -> Transformer:
    """Route every MoE layer's experts through ``backend``; count routed tokens in ``stats`` when given."""
    require_backend(backend)
    for moe in model.moe_layers():
        moe.backend, moe.stats = backend, stats
    return model

