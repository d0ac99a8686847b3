"""Load routed experts into an ExpertShard, reading only the tensors of the experts asked for."""

from __future__ import annotations

import torch

from moemesh.model.checkpoint import Checkpoint, expert_tensor_names
from moemesh.model.config import ModelConfig

from .shard import ExpertShard


def all_experts(cfg: ModelConfig) -> dict[int, list[int]]:
    """Every routed expert of every MoE layer: what a single process hosts."""
    return {layer: list(range(cfg.n_routed_experts)) for layer in cfg.moe_layers}


def load_experts(
    shard: ExpertShard,
    model_dir: str,
    cfg: ModelConfig,
    experts: dict[int, list[int]],
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> None:
    """Add ``experts`` (MoE layer -> expert ids) to ``shard``; only their weights are read."""
    wanted = [name for layer, ids in experts.items() for e in ids for name in expert_tensor_names(layer, e)]
    tensors = Checkpoint(model_dir, cfg).load(wanted, dtype=dtype, progress=progress, desc="loading experts")
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
) -> ExpertShard:
    """A shard of ``experts`` (default: all) on ``device``; ``keep_fp8`` keeps FP8 checkpoints' experts e4m3."""
    if keep_fp8:
        raise NotImplementedError("keep_fp8: routed experts kept as e4m3 come with the FP8 work of issue [H]")
    shard = ExpertShard(cfg.n_routed_experts, dtype, fused_moe=fused_moe, device=device)
    load_experts(shard, model_dir, cfg, all_experts(cfg) if experts is None else experts, dtype, progress)
    return shard
