"""Wiring roles together: the embedded single process, and the attention side of a mesh.

The single process is the attention engine wired to an in-process shard of every
expert; the mesh's attention side is the same engine wired to the gRPC backend.

This is the only place (with the CLI) that imports both roles: roles never
import each other, the top of ``moemesh`` wires them together.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.attn_node.attach import attach_experts
from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.attn_node.loader import load_transformer
from moemesh.attn_node.experts.remote_backend import RemoteExpertBackend
from moemesh.attn_node.experts.torch_link import links_for
from moemesh.model.checkpoint import checkpoint_fingerprint
from moemesh.model.config import ModelConfig
from moemesh.expert_node.loader import load_expert_shard
from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.kernels.cpu_fp8 import resolve_keep_fp8
from moemesh.kernels.cpu_kernels import resolve_weights_dtype
from moemesh.kernels.ops import select_ops
from moemesh.control.placement import Placement, parse_expert_spec
from moemesh import devices
from moemesh.model.tokenizer import Tokenizer


@dataclass
class EmbeddedMesh:
    cfg: ModelConfig
    engine: Engine
    tokenizer: Tokenizer | None
    remote: RemoteExpertBackend | None = None  # the mesh's backend, for its links; None in the single process
    device: torch.device = torch.device("cpu")  # where the weights, the latent cache and the sampler live
    dtype: torch.dtype = torch.float32

    def close(self) -> None:
        self.engine.backend.close()


def build_local(
    model_dir: str | Path,
    dtype: str = "auto",
    engine_config: EngineConfig = EngineConfig(),
    progress: bool = True,
    kernels: str = "auto",
    device: str = "auto",
    fp8: str = "auto",
) -> EmbeddedMesh:
    """The single process: every expert in an in-process shard, everything on one ``device``.

    ``device``/``dtype``/``fp8`` as the flags (moemesh/devices.py); resolved once, here: an absent
    device raises DeviceUnavailableError before anything loads."""
    cfg = ModelConfig.from_dir(model_dir)
    torch_device = devices.resolve_device(device)
    torch_dtype = resolve_weights_dtype(dtype, cfg.dtype, torch_device)
    ops = select_ops(torch_device, kernels)
    shard = load_expert_shard(str(model_dir), cfg, dtype=torch_dtype, progress=progress, fused_moe=ops.fused_moe,
                              fused_moe_fp8=ops.fused_moe_fp8, device=torch_device,
                              keep_fp8=resolve_keep_fp8(fp8, torch_device))
    backend = LocalExpertBackend(shard)
    model = attach_experts(load_transformer(str(model_dir), cfg, torch_dtype, progress, ops, torch_device), backend)
    return EmbeddedMesh(cfg, Engine(model, cfg, engine_config, backend=backend), Tokenizer.from_dir(model_dir),
                        device=torch_device, dtype=torch_dtype)


def build_remote(
    model_dir: str | Path,
    expert_nodes: list[tuple[str, str]],
    dtype: str = "auto",
    engine_config: EngineConfig = EngineConfig(),
    progress: bool = True,
    dispatch_timeout_s: float = 30.0,
    kernels: str = "auto",
    transport: str = "grpc",
    device: str = "auto",
) -> EmbeddedMesh:
    """The attention side of a mesh on ``device``: routed experts on expert nodes, given as [(HOST:PORT, SPEC)].

    ``transport="torch"``: payloads over a torch.distributed group per node (attn_node/experts/torch_link.py);
    the groups form in the background, rows go over gRPC until they are up."""
    cfg = ModelConfig.from_dir(model_dir)
    torch_device = devices.resolve_device(device)
    torch_dtype = resolve_weights_dtype(dtype, cfg.dtype, torch_device)
    hosted = [(address, parse_expert_spec(spec, cfg.moe_layers, cfg.n_routed_experts)) for address, spec in expert_nodes]
    backend = RemoteExpertBackend(cfg, Placement.from_hosted(hosted), timeout_s=dispatch_timeout_s,
                                  link_factory=links_for(transport, cfg.hidden_size, dispatch_timeout_s,
                                                         device=torch_device),
                                  checkpoint=checkpoint_fingerprint(model_dir), device=torch_device)
    try:
        model = load_transformer(str(model_dir), cfg, torch_dtype, progress, select_ops(torch_device, kernels),
                                 torch_device)
        engine = Engine(attach_experts(model, backend), cfg, engine_config, backend=backend)
    except BaseException:
        backend.close()
        raise
    return EmbeddedMesh(cfg, engine, Tokenizer.from_dir(model_dir), backend, torch_device, torch_dtype)


# Bump when write_tiny_checkpoint's output changes, so a machine's cached demo is written again
# (2: tokenizer_config.json carries the chat template the HTTP door's /v1/chat/completions needs).
DEMO_VERSION = 2


def demo_model_dir() -> Path:
    """Where the embedded default (a tiny random checkpoint) lives: $MOEMESH_HOME or ~/.cache/moemesh."""
    home = os.environ.get("MOEMESH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "moemesh")
    return Path(home) / f"demo-tiny-v3-{DEMO_VERSION}"


def ensure_demo_model() -> Path:
    """Write the tiny demo checkpoint the first time it is needed."""
    from moemesh.model.tiny import write_tiny_checkpoint

    path = demo_model_dir()
    if not (path / "config.json").is_file():
        # Write beside it and rename: an interrupted or concurrent first run never leaves half a checkpoint.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
        write_tiny_checkpoint(tmp, arch="deepseek_v3", seed=0)
        try:
            os.replace(tmp, path)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path
