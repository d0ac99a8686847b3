"""The argument checks of kernels/fused_moe.py's entry points: each names the argument and what to give."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_routing(x, topk_idx, topk_weights, n_experts: int, check_ids: bool) -> None:
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [T, K] with T = {x.shape[0]}, got {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"topk_idx must hold integer expert ids, got {topk_idx.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(
            f"topk_weights must match topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_weights.shape)}"
        )
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move them to one device")
    if check_ids and topk_idx.numel():
        lo, hi = topk_idx.min().item(), topk_idx.max().item()  # the one host sync (check_ids=False skips it)
        if lo < -1 or hi >= n_experts:
            raise ValueError(f"topk_idx holds ids in {lo}..{hi}; they must be in 0..{n_experts - 1} or -1 (skip)")


def check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [T, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_weights(x, w13, w2) -> tuple[int, int, int]:
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, D] and w2 [E, D, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}")
    n_experts, two_i, d = w13.shape
    inter = two_i // 2
    if n_experts < 1 or two_i % 2 or two_i == 0:
        raise ValueError(f"w13 must be [E, 2I, D] with E >= 1 and an even, non-zero 2I; got {tuple(w13.shape)}")
    if d != x.shape[1]:
        raise ValueError(f"w13 is [E, 2I, D] with D = {d}, but x has D = {x.shape[1]}")
    if tuple(w2.shape) != (n_experts, d, inter):
        raise ValueError(f"w2 must be [E, D, I] = {[n_experts, d, inter]} to match w13, got {list(w2.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move them to one device")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (call .contiguous())")
    return n_experts, d, inter


def check_scales(name: str, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> None:
    if w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name} must be torch.float8_e4m3fn, got {w.dtype}")
    e, rows, cols = w.shape
    want = (e, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(s.shape) != want:
        raise ValueError(
            f"{name} scale_inv has shape {list(s.shape)}, but {list(w.shape)} weights in {block[0]}x{block[1]} "
            f"blocks need {list(want)}: check quantization_config.weight_block_size"
        )
    if s.dtype != torch.float32:
        raise ValueError(f"{name} scale_inv must be float32, got {s.dtype}")
    if s.device != w.device:
        raise ValueError(f"{name} scale_inv is on {s.device} but the weights are on {w.device}")
