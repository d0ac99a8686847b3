"""The expert-backend seam: the whole lifecycle is the protocol, and models are wired to it from outside.

A backend lacking a method cannot be built (every method is abstract) nor attached (the protocol is
checked at the wiring boundary); the static base's step hooks are no-ops and never wait; a model is
built with no backend and ``attach_experts`` sets it, with the load statistics, on every MoE layer.
"""

from __future__ import annotations

import time

import pytest
import torch

from moemesh.attn_node.attach import attach_experts
from moemesh.attn_node.engine import Engine
from moemesh.attn_node.load_stats import LoadStats
from moemesh.attn_node.model import MoE, Transformer
from moemesh.attn_node.experts.remote_backend import RemoteExpertBackend
from moemesh.attn_node.experts.switchable_backend import SwitchableBackend
from moemesh.expert_backend import ExpertBackend, StaticExpertBackend, require_backend
from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import tiny_config_dict

LIFECYCLE = {"dispatch", "combine", "begin_step", "end_step", "wait_for_change", "close"}


class Zeros(StaticExpertBackend):
    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        return torch.zeros_like(x)

    def combine(self, handle):
        return handle


class DispatchOnly:
    """What a backend looked like before the hooks were part of the protocol."""

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        return x

    def combine(self, handle):
        return handle


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config_dict(hidden_size=32, layers=3, experts=4, experts_per_token=2))


def test_the_protocol_is_the_whole_lifecycle_and_all_abstract():
    assert ExpertBackend.__abstractmethods__ == LIFECYCLE
    assert StaticExpertBackend.__abstractmethods__ == {"dispatch", "combine"}


def test_a_backend_lacking_a_method_cannot_be_built():
    class NoCombine(StaticExpertBackend):
        def dispatch(self, layer_id, x, topk_idx, topk_weights):
            return x

    with pytest.raises(TypeError, match="combine"):
        NoCombine()

    class NoHooks(ExpertBackend):
        dispatch, combine = DispatchOnly.dispatch, DispatchOnly.combine

    with pytest.raises(TypeError, match="begin_step"):
        NoHooks()


@pytest.mark.parametrize("cls", [LocalExpertBackend, RemoteExpertBackend, SwitchableBackend])
def test_every_backend_implements_the_whole_protocol(cls):
    assert issubclass(cls, ExpertBackend) and not cls.__abstractmethods__


def test_the_static_base_hooks_do_nothing_and_never_wait():
    backend = Zeros()
    generation = backend.begin_step()
    backend.end_step()
    assert generation == 0 and backend.begin_step() == generation  # nothing ever changes
    backend.end_step()
    started = time.monotonic()
    assert backend.wait_for_change(generation, 10.0) is False
    assert time.monotonic() - started < 1.0
    backend.close()


def test_a_duck_typed_backend_without_hooks_is_refused_at_the_wiring(cfg):
    with pytest.raises(TypeError, match="StaticExpertBackend"):
        require_backend(DispatchOnly())
    model = Transformer(cfg)
    with pytest.raises(TypeError, match="not an ExpertBackend"):
        attach_experts(model, DispatchOnly())
    with pytest.raises(TypeError, match="not an ExpertBackend"):
        Engine(model, cfg, backend=DispatchOnly())
    assert require_backend(backend := Zeros()) is backend


def test_a_model_builds_without_a_backend_and_says_so_when_run(cfg):
    model = Transformer(cfg)
    moes = model.moe_layers()
    assert [moe.layer_id for moe in moes] == list(cfg.moe_layers) and all(isinstance(m, MoE) for m in moes)
    assert all(moe.backend is None and moe.stats is None for moe in moes)
    with pytest.raises(RuntimeError, match=f"MoE layer {moes[0].layer_id} has no expert backend"):
        moes[0].start(torch.zeros(2, cfg.hidden_size))


def test_attach_experts_wires_every_moe_layer_and_only_those(cfg):
    model = Transformer(cfg)
    backend, stats = Zeros(), LoadStats(cfg.moe_layers, cfg.n_routed_experts)
    assert attach_experts(model, backend, stats) is model
    assert all(moe.backend is backend and moe.stats is stats for moe in model.moe_layers())
    dense = [layer.ffn for layer in model.layers if not isinstance(layer.ffn, MoE)]
    assert dense and not any(hasattr(ffn, "backend") for ffn in dense)
    other = Zeros()
    attach_experts(model, other)  # re-wiring replaces both
    assert all(moe.backend is other and moe.stats is None for moe in model.moe_layers())
    with pytest.raises(ValueError, match="attach_experts"):
        Engine(model, cfg, backend=backend)
