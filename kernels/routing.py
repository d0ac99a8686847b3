"""MoE routing: gate logits -> (top-k expert ids, weights), every DeepSeek-V2/V3 variant in one Triton kernel.

Glossary: T tokens, E routed experts, K top_k, G n_group, S = E // G experts per group.

Math (that of :class:`moemesh.attn_node.model.Gate`, after its ``logits = x @ W^T``):

* scores = softmax(logits) or sigmoid(logits), fp32;
* ``greedy``: top-k of scores;
* ``group_limited_greedy`` (V2): groups ranked by their best score, the
  ``topk_group`` best kept, other experts' scores set to 0, then top-k;
* ``noaux_tc`` (V3): choice = scores + bias; groups ranked by the sum of their two
  best choices; top-k of choice over the kept groups; the weights are the
  *unbiased* scores of the chosen experts;
* if ``norm_topk_prob`` the weights are divided by their sum (+1e-20), for any K
  (as Gate and transformers' V3 router; with K = 1 that makes the weight 1);
  finally they are multiplied by ``routed_scaling_factor``.

The order of the K chosen experts is not specified (``torch.topk(sorted=False)``
in the reference); compare sets.

Kernel layout: one program per block of tokens; each token's E logits are held
as a [G, S] tile padded to powers of two, so per-group reductions are plain
axis reductions; group and expert selection are K (or ``topk_group``) rounds of
arg-max and mask, ties going to the lowest expert id.

:func:`select_route` chooses the Triton op or the torch reference once. The launch is the torch
custom op ``moemesh::route`` with a fake impl (kernels/library.py), so it runs under FakeTensorMode;
neither the kernel's wrapper nor the reference reads device data on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .choose import use_triton
from .library import expect, expect_one_device, op_name

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references need only torch
    triton = None

HAS_TRITON = triton is not None

__all__ = ["route", "route_ref", "select_route", "SCORING_FUNCS", "TOPK_METHODS"]

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


if HAS_TRITON:

    @triton.jit
    def route_kernel(
        logits_ptr,  # [T, E]
        bias_ptr,  # [E] fp32 (noaux_tc only; any pointer otherwise)
        idx_ptr,  # [T, K] int64 out
        w_ptr,  # [T, K] fp32 out
        T,
        stride_lt,
        stride_le,
        scale,
        N_GROUP: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        TOPK_GROUP: tl.constexpr,
        TOP_K: tl.constexpr,
        SIGMOID: tl.constexpr,
        METHOD: tl.constexpr,  # 0 greedy, 1 group_limited_greedy, 2 noaux_tc
        NORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        row_ok = rows < T
        g = tl.arange(0, BLOCK_G)
        j = tl.arange(0, BLOCK_S)
        e2 = g[:, None] * GROUP_SIZE + j[None, :]  # [BG, BS] expert id
        ok2 = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)
        e3 = e2[None, :, :]  # [1, BG, BS]
        ok3 = ok2[None, :, :] & (rows[:, None, None] >= 0)  # [BT, BG, BS]
        neg_inf = float("-inf")

        ptrs = logits_ptr + rows[:, None, None].to(tl.int64) * stride_lt + e3 * stride_le
        logits = tl.load(ptrs, mask=row_ok[:, None, None] & ok2[None, :, :], other=0.0).to(tl.float32)
        if SIGMOID:
            scores = 1.0 / (1.0 + tl.exp(-logits))
        else:
            lm = tl.where(ok3, logits, neg_inf)
            row_max = tl.max(tl.max(lm, axis=2), axis=1)  # [BT]
            p = tl.exp(lm - row_max[:, None, None])  # padding -> 0
            scores = p / tl.sum(tl.sum(p, axis=2), axis=1)[:, None, None]
        scores = tl.where(ok3, scores, 0.0)  # [BT, BG, BS]

        if METHOD == 0:
            sel = scores
        else:
            if METHOD == 1:
                choice = scores
                group_score = tl.max(tl.where(ok3, scores, neg_inf), axis=2)  # [BT, BG]
            else:
                bias = tl.load(bias_ptr + e2, mask=ok2, other=0.0).to(tl.float32)  # [BG, BS]
                choice = tl.where(ok3, scores + bias[None, :, :], neg_inf)
                best = tl.max(choice, axis=2)  # [BT, BG]
                best_j = tl.argmax(choice, axis=2)  # [BT, BG]
                second = tl.max(tl.where(j[None, None, :] == best_j[:, :, None], neg_inf, choice), axis=2)
                group_score = best + second
            group_score = tl.where(g[None, :] < N_GROUP, group_score, neg_inf)
            keep = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                top = tl.argmax(group_score, axis=1)  # [BT]
                hit = g[None, :] == top[:, None]
                keep = keep | hit
                group_score = tl.where(hit, neg_inf, group_score)
            if METHOD == 1:
                sel = tl.where(keep[:, :, None], scores, 0.0)  # the reference fills dropped groups with 0
            else:
                sel = tl.where(keep[:, :, None], choice, neg_inf)
        sel = tl.where(ok3, sel, neg_inf)

        kcol = tl.arange(0, BLOCK_K)
        out_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        out_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for i in tl.static_range(TOP_K):
            m = tl.max(tl.max(sel, axis=2), axis=1)  # [BT]
            cand = tl.where(sel == m[:, None, None], e3, 1 << 30)
            pick = tl.min(tl.min(cand, axis=2), axis=1)  # [BT] lowest id among the maxima
            is_pick = e3 == pick[:, None, None]
            w = tl.sum(tl.sum(tl.where(is_pick, scores, 0.0), axis=2), axis=1)  # [BT] unbiased score
            sel = tl.where(is_pick, neg_inf, sel)
            out_w = tl.where(kcol[None, :] == i, w[:, None], out_w)
            out_i = tl.where(kcol[None, :] == i, pick[:, None], out_i)
        if NORM:
            out_w = out_w / (tl.sum(out_w, axis=1)[:, None] + 1e-20)
        out_w = out_w * scale

        offs = rows[:, None].to(tl.int64) * TOP_K + kcol[None, :]
        mask = row_ok[:, None] & (kcol[None, :] < TOP_K)
        tl.store(idx_ptr + offs, out_i.to(tl.int64), mask=mask)
        tl.store(w_ptr + offs, out_w, mask=mask)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _check(
    logits, top_k, scoring_func, topk_method, n_group, topk_group, bias
) -> tuple[int, int]:
    """Validate; returns (groups, group size) as the kernel sees them (greedy: one group)."""
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating [T, E] tensor, got {logits.dtype} {tuple(logits.shape)}")
    n_experts = logits.shape[1]
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k ({top_k}) must be in 1..E ({n_experts})")
    if topk_method == "greedy":
        if bias is not None:
            raise ValueError("bias (e_score_correction_bias) is only used by topk_method='noaux_tc'")
        return 1, n_experts
    if n_group < 1 or n_experts % n_group:
        raise ValueError(f"n_group ({n_group}) must divide the number of experts ({n_experts})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group ({topk_group}) must be in 1..n_group ({n_group})")
    group_size = n_experts // n_group
    if topk_group * group_size < top_k:
        raise ValueError(f"topk_group ({topk_group}) groups of {group_size} experts cannot supply top_k ({top_k})")
    if topk_method == "noaux_tc":
        if group_size < 2:
            raise ValueError("noaux_tc ranks groups by their top-2 scores: groups need >= 2 experts")
        if bias is None or tuple(bias.shape) != (n_experts,):
            got = None if bias is None else tuple(bias.shape)
            raise ValueError(f"noaux_tc needs bias (e_score_correction_bias) of shape [{n_experts}], got {got}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device} but logits are on {logits.device}")
    elif bias is not None:
        raise ValueError("bias (e_score_correction_bias) is only used by topk_method='noaux_tc'")
    return n_group, group_size


@torch.library.custom_op(op_name("route"), mutates_args=())
def route_launch(
    logits: torch.Tensor,  # [T, E]
    bias: torch.Tensor | None,  # [E] fp32, contiguous (noaux_tc only)
    top_k: int,
    n_group: int,  # groups as the kernel sees them (greedy: 1)
    group_size: int,
    topk_group: int,
    sigmoid: bool,
    method: int,  # TOPK_METHODS.index(topk_method)
    norm: bool,
    scale: float,  # routed_scaling_factor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing kernel (a custom op, see kernels/library.py): (idx [T, K] int64, weights [T, K] fp32)."""
    t = logits.shape[0]
    idx = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    block_g, block_s = _pow2(n_group), _pow2(group_size)
    # tokens per program: up to 16, fewer for wide expert tiles (V3: 256 experts -> 8 tokens)
    block_t = max(1, min(16, _pow2(t), 2048 // (block_g * block_s)))
    route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias if bias is not None else logits, idx, weights,
        t, logits.stride(0), logits.stride(1), scale,
        N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group,
        TOP_K=top_k, SIGMOID=sigmoid, METHOD=method, NORM=norm,
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_K=_pow2(top_k),
    )  # fmt: skip
    return idx, weights


@route_launch.register_fake
def _(logits, bias, top_k, n_group, group_size, topk_group, sigmoid, method, norm, scale):
    op = "route"
    expect_one_device(op, logits=logits, bias=bias)
    expect(logits.dim() == 2 and logits.dtype.is_floating_point, op, "logits must be a floating [T, E] tensor")
    expect(n_group * group_size == logits.shape[1], op, "n_group * group_size must be E")
    expect(1 <= top_k <= logits.shape[1] and 1 <= topk_group <= n_group, op, "top_k in 1..E, topk_group in 1..G")
    expect(0 <= method < len(TOPK_METHODS), op, f"method must index {TOPK_METHODS}")
    if bias is not None:
        expect(tuple(bias.shape) == (logits.shape[1],) and bias.dtype == torch.float32, op, "bias must be fp32 [E]")
    t = logits.shape[0]
    return logits.new_empty(t, top_k, dtype=torch.int64), logits.new_empty(t, top_k, dtype=torch.float32)


def route(
    logits: torch.Tensor,  # [T, E]
    *,
    top_k: int,
    scoring_func: str,
    topk_method: str,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,  # [E], noaux_tc only
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton routing: (topk_idx [T, K] int64, topk_weights [T, K] fp32); the K ids in no set order.

    The checks read shapes only (no host sync).
    """
    if not HAS_TRITON:
        raise RuntimeError("route: triton is not installed; use route_ref or select_route(device)")
    groups, group_size = _check(logits, top_k, scoring_func, topk_method, n_group, topk_group, bias)
    t = logits.shape[0]
    if t == 0:
        empty = logits.new_empty(0, top_k, dtype=torch.int64)
        return empty, logits.new_empty(0, top_k, dtype=torch.float32)
    return route_launch(
        logits, bias.float().contiguous() if bias is not None else None,
        top_k, groups, group_size, topk_group if topk_method != "greedy" else 1,
        scoring_func == "sigmoid", TOPK_METHODS.index(topk_method), bool(norm_topk_prob), float(routed_scaling_factor),
    )  # fmt: skip


def route_ref(
    logits: torch.Tensor,  # [T, E]
    *,
    top_k: int,
    scoring_func: str,
    topk_method: str,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the math of attn_node.model.Gate; same arguments and checks as :func:`route`."""
    _check(logits, top_k, scoring_func, topk_method, n_group, topk_group, bias)
    logits = logits.float()
    t, n_experts = logits.shape
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)  # [T, E]

    def kept_experts(group_scores: torch.Tensor) -> torch.Tensor:  # [T, G] -> [T, E] bool
        best = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
        return keep.unsqueeze(-1).expand(t, n_group, n_experts // n_group).reshape(t, n_experts)

    if topk_method == "greedy":
        weights, idx = scores.topk(top_k, dim=-1)
    elif topk_method == "group_limited_greedy":
        keep = kept_experts(scores.view(t, n_group, -1).max(dim=-1).values)
        weights, idx = torch.where(keep, scores, 0.0).topk(top_k, dim=-1)
    else:
        choice = scores + bias.float()  # [T, E]
        keep = kept_experts(choice.view(t, n_group, -1).topk(2, dim=-1).values.sum(dim=-1))
        idx = torch.where(keep, choice, float("-inf")).topk(top_k, dim=-1).indices
        weights = torch.gather(scores, 1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * routed_scaling_factor


def select_route(device: torch.device | str, force_triton: bool = False) -> Callable:
    """The routing function for ``device``, chosen once: Triton on CUDA (or when forced), torch elsewhere."""
    return route if use_triton(device, force_triton, "select_route") else route_ref
