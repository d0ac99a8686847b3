"""Load routed experts into an ExpertShard, reading only the tensors of the experts asked for."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moemesh.devices import compute_dtype
from moemesh.model.checkpoint import Checkpoint, expert_tensor_names
from moemesh.model.config import ModelConfig

from .shard import ExpertShard


def all_experts(cfg: ModelConfig) -> dict[int, list[int]]:
    """Every routed expert of every MoE layer: what a single process hosts."""
    return {layer: list(range(cfg.n_routed_experts)) for layer in cfg.moe_layers}


def new_expert_shard(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    fused_moe: Callable | None = None,
    *,
    device: torch.device | str = "cpu",
    keep_fp8: bool = False,
    fused_moe_fp8: Callable | None = None,
) -> ExpertShard:
    """An empty shard for ``cfg``'s experts on ``device``.

    ``keep_fp8`` applies to FP8 block-quantized checkpoints only (others load as they are):
    the experts stay e4m3 in the checkpoint's blocks and run through ``fused_moe_fp8``,
    which, when not given, is chosen from the device (the Triton op on CUDA, the torch
    reference elsewhere: see :func:`moemesh.kernels.fused_moe.select_fused_moe`).
    """
    fp8_block = cfg.quant.block_size if keep_fp8 and cfg.quant is not None else None
    # ``dtype`` is the weights'; the math runs in the device's compute dtype (fp32 on CPU, see moemesh/devices.py)
    return ExpertShard(cfg.n_routed_experts, compute_dtype(dtype, device), fused_moe=fused_moe, device=device,
                       fp8_block=fp8_block, fused_moe_fp8=fused_moe_fp8, weight_dtype=dtype)


def default_fused_moe(device: torch.device | str) -> Callable | None:
    """The fused-MoE op a node uses for ``device`` when nothing else chose: Triton on CUDA, None (the shard's CPU
    strategies) on CPUs -- what ``select_ops(device, "auto")`` gives the engine."""
    from moemesh.kernels.ops import select_ops

    return select_ops(device, "auto").fused_moe


def load_experts(
    shard: ExpertShard,
    model_dir: str,
    cfg: ModelConfig,
    experts: dict[int, list[int]],
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> None:
    """Add ``experts`` (MoE layer -> expert ids) to ``shard``; only their weights are read.

    An FP8-kept shard (``shard.fp8_block``) gets the stored e4m3 weights and scales, undequantized.
    """
    wanted = [name for layer, ids in experts.items() for e in ids for name in expert_tensor_names(layer, e)]
    keep = shard.fp8_block is not None
    tensors = Checkpoint(model_dir, cfg).load(wanted, dtype=dtype, progress=progress, desc="loading experts",
                                              keep_fp8=keep)
    for layer, ids in experts.items():
        weights = {}
        for e in ids:
            gate, up, down = (tensors[n] for n in expert_tensor_names(layer, e))
            weights[e] = (gate, up, down)
        shard.add_experts(layer, weights)


def load_expert_shard(
    model_dir: str,
    cfg: ModelConfig,
    experts: dict[int, list[int]] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    fused_moe=None,
    *,
    device: torch.device | str = "cpu",
    keep_fp8: bool = False,
    fused_moe_fp8=None,
) -> ExpertShard:
    """A shard of ``experts`` (default: all) on ``device``; ``keep_fp8`` keeps FP8 checkpoints' experts e4m3
    (see :func:`new_expert_shard`)."""
    shard = new_expert_shard(cfg, dtype, fused_moe, device=device, keep_fp8=keep_fp8, fused_moe_fp8=fused_moe_fp8)
    load_experts(shard, model_dir, cfg, all_experts(cfg) if experts is None else experts, dtype, progress)
    return shard
