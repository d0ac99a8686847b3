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
from moemesh.kernels.ops import select_ops
from moemesh.control.placement import Placement, parse_expert_spec
from moemesh.model.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EmbeddedMesh:
    cfg: ModelConfig
    engine: Engine
    tokenizer: Tokenizer | None
    remote: RemoteExpertBackend | None = None  # the mesh's backend, for its links; None in the single process

    def close(self) -> None:
        self.engine.backend.close()


def _device() -> torch.device:
    # The engine runs on CPU today; GPU placement of weights and cache comes with the GPU work.
    return torch.device("cpu")


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """'auto' = the checkpoint's dtype on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if name == "auto":
        return DTYPES[cfg.dtype] if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def build_local(
    model_dir: str | Path,
    dtype: str = "auto",
    engine_config: EngineConfig = EngineConfig(),
    progress: bool = True,
    kernels: str = "auto",
) -> EmbeddedMesh:
    """The single process: every expert in an in-process shard."""
    cfg = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    ops = select_ops(_device(), kernels)
    shard = load_expert_shard(str(model_dir), cfg, dtype=torch_dtype, progress=progress, fused_moe=ops.fused_moe)
    backend = LocalExpertBackend(shard)
    model = attach_experts(load_transformer(str(model_dir), cfg, torch_dtype, progress, ops), backend)
    return EmbeddedMesh(cfg, Engine(model, cfg, engine_config, backend=backend), Tokenizer.from_dir(model_dir))


def build_remote(
    model_dir: str | Path,
    expert_nodes: list[tuple[str, str]],
    dtype: str = "auto",
    engine_config: EngineConfig = EngineConfig(),
    progress: bool = True,
    dispatch_timeout_s: float = 30.0,
    kernels: str = "auto",
    transport: str = "grpc",
) -> EmbeddedMesh:
    """The attention side of a mesh: routed experts on expert nodes, given as [(HOST:PORT, SPEC)].

    ``transport="torch"``: payloads over a torch.distributed group per node (attn_node/experts/torch_link.py);
    the groups form in the background, rows go over gRPC until they are up."""
    cfg = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    hosted = [(address, parse_expert_spec(spec, cfg.moe_layers, cfg.n_routed_experts)) for address, spec in expert_nodes]
    backend = RemoteExpertBackend(cfg, Placement.from_hosted(hosted), timeout_s=dispatch_timeout_s,
                                  link_factory=links_for(transport, cfg.hidden_size, dispatch_timeout_s,
                                                         device=_device()),
                                  checkpoint=checkpoint_fingerprint(model_dir))
    try:
        model = load_transformer(str(model_dir), cfg, torch_dtype, progress, select_ops(_device(), kernels))
        engine = Engine(attach_experts(model, backend), cfg, engine_config, backend=backend)
    except BaseException:
        backend.close()
        raise
    return EmbeddedMesh(cfg, engine, Tokenizer.from_dir(model_dir), backend)


def demo_model_dir() -> Path:
    """Where the embedded default (a tiny random checkpoint) lives: $MOEMESH_HOME or ~/.cache/moemesh."""
    home = os.environ.get("MOEMESH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "moemesh")
    return Path(home) / "demo-tiny-v3"


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
