"""route (Triton, CPU interpreter) against route_ref, and route_ref against attn_node's Gate.

Routings compare as sets: each row's experts sorted by id, weights carried along.
Logits are a shuffled grid, so no two scores in a row tie.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from .moe_utils import kernel_device, kernel_module, sort_by_expert  # noqa: E402

from moemesh.attn_node.model import Gate
from moemesh.kernels.ops import select_ops  # noqa: E402
from moemesh.model.config import ModelConfig  # noqa: E402
from moemesh.model.tiny import tiny_config_dict  # noqa: E402

routing = kernel_module("moemesh.kernels.routing")


def _distinct_logits(t: int, e: int, seed: int) -> torch.Tensor:
    """[T, E] fp32 logits in (-3, 3), all different (spacing 6/(T*E))."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randperm(t * e, generator=gen).float().view(t, e) + 0.5) * (6.0 / (t * e)) - 3.0


def _bias(e: int, seed: int) -> torch.Tensor:
    return torch.randn(e, generator=torch.Generator().manual_seed(seed + 100)) * 0.2


def _assert_same_routing(a, b) -> None:
    ia, wa = sort_by_expert(*a)
    ib, wb = sort_by_expert(*b)
    assert torch.equal(ia, ib), f"different experts chosen:\n{ia}\n{ib}"
    torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)


# name: (T, E, route kwargs)
CASES = {
    "softmax_greedy_E6": (13, 6, dict(top_k=2, scoring_func="softmax", topk_method="greedy")),
    "softmax_greedy_K1_norm": (
        5, 12, dict(top_k=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=True),
    ),
    "sigmoid_greedy_norm_scaled": (
        17, 6, dict(top_k=3, scoring_func="sigmoid", topk_method="greedy", norm_topk_prob=True,
                    routed_scaling_factor=2.5),
    ),
    "softmax_group_limited": (
        13, 12, dict(top_k=4, scoring_func="softmax", topk_method="group_limited_greedy", n_group=3, topk_group=2,
                     routed_scaling_factor=16.0),
    ),
    "sigmoid_group_limited_groups_of_3": (
        9, 12, dict(top_k=3, scoring_func="sigmoid", topk_method="group_limited_greedy", n_group=4, topk_group=1),
    ),
    "sigmoid_noaux_tc": (
        17, 12, dict(top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=3, topk_group=2,
                     norm_topk_prob=True, routed_scaling_factor=2.5),
    ),
    "softmax_noaux_tc_groups_of_2": (
        7, 6, dict(top_k=2, scoring_func="softmax", topk_method="noaux_tc", n_group=3, topk_group=2,
                   norm_topk_prob=True),
    ),
    "sigmoid_noaux_tc_E16_K1": (
        11, 16, dict(top_k=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                     norm_topk_prob=True, routed_scaling_factor=2.5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_reference(case):
    dev = kernel_device()
    t, e, kwargs = CASES[case]
    seed = list(CASES).index(case)
    logits = _distinct_logits(t, e, seed).to(dev)
    bias = _bias(e, seed).to(dev) if kwargs["topk_method"] == "noaux_tc" else None
    got = routing.route(logits, bias=bias, **kwargs)
    assert got[0].shape == (t, kwargs["top_k"]) and got[0].dtype == torch.int64 and got[1].dtype == torch.float32
    _assert_same_routing(got, routing.route_ref(logits, bias=bias, **kwargs))


def test_route_reads_fp16_and_strided_logits():
    dev = kernel_device()
    kwargs = CASES["sigmoid_noaux_tc"][2]
    wide = _distinct_logits(9, 24, 7).to(dev)
    logits = wide[:, ::2]  # [9, 12], stride 2
    bias = _bias(12, 7).to(dev)
    _assert_same_routing(routing.route(logits, bias=bias, **kwargs), routing.route_ref(logits, bias=bias, **kwargs))
    half = logits.half()
    _assert_same_routing(routing.route(half, bias=bias, **kwargs), routing.route_ref(half, bias=bias, **kwargs))
    idx, weights = routing.route(logits[:0], bias=bias, **kwargs)
    assert idx.shape == weights.shape == (0, 4)


# Gate configs: (arch, experts, top_k, config overrides)
GATES = {
    "v2_greedy_softmax": ("deepseek_v2", 6, 2, {}),
    "v2_group_limited": (
        "deepseek_v2", 12, 3,
        dict(topk_method="group_limited_greedy", n_group=3, topk_group=2, norm_topk_prob=True,
             routed_scaling_factor=16.0),
    ),
    "v3_noaux_tc": ("deepseek_v3", 12, 4, dict(n_group=3, topk_group=2, routed_scaling_factor=2.5)),
    "v3_sigmoid_greedy_K1": ("deepseek_v3", 6, 1, dict(topk_method="greedy", n_group=1, topk_group=1)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GATES))
def test_attn_node_gate_on_the_kernel_matches_the_reference(name):
    """The model's Gate passes every config field to the routing op: kernel-backed Gate == route_ref."""
    arch, experts, top_k, overrides = GATES[name]
    d = tiny_config_dict(arch=arch, hidden_size=64, experts=experts, experts_per_token=top_k)
    d.update(overrides)
    cfg = ModelConfig.from_dict(d)
    gate = Gate(cfg, select_ops("cpu", "triton"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(experts, cfg.hidden_size, generator=gen) * 0.3)
        if gate.bias is not None:
            gate.bias.copy_(torch.randn(experts, generator=gen) * 0.2)
    x = torch.randn(9, cfg.hidden_size, generator=gen)
    logits = F.linear(x.float(), gate.weight)  # [T, E]
    ref = routing.route_ref(
        logits, top_k=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func, topk_method=cfg.topk_method,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, bias=gate.bias,
    )  # fmt: skip
    _assert_same_routing(ref, gate(x))


def test_route_rejects_bad_arguments():
    logits = _distinct_logits(3, 12, 0)
    base = dict(top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=3, topk_group=2)
    for fn in (routing.route, routing.route_ref):
        with pytest.raises(ValueError, match=r"bias .* of shape \[12\]"):
            fn(logits, **base)
        with pytest.raises(ValueError, match="n_group"):
            fn(logits, bias=torch.zeros(12), **{**base, "n_group": 5})
        with pytest.raises(ValueError, match="cannot supply top_k"):
            fn(logits, bias=torch.zeros(12), **{**base, "top_k": 9})
        with pytest.raises(ValueError, match="scoring_func"):
            fn(logits, bias=torch.zeros(12), **{**base, "scoring_func": "relu"})
        with pytest.raises(ValueError, match="only used by"):
            fn(logits, top_k=2, scoring_func="softmax", topk_method="greedy", bias=torch.zeros(12))
        with pytest.raises(ValueError, match="top_k"):
            fn(logits, top_k=13, scoring_func="softmax", topk_method="greedy")


def test_select_chooses_once_by_device():
    assert routing.select_route("cpu") is routing.route_ref
    assert routing.select_route("cpu", force_triton=True) is routing.route
    assert routing.select_route(torch.device("cuda")) is routing.route
