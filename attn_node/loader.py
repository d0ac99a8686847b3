"""Build the attention-side Transformer from a checkpoint directory (never reading routed experts).

The model comes back with no expert backend: the caller attaches one (attn_node/attach.py).
"""

from __future__ import annotations

import torch

from moemesh.model.checkpoint import Checkpoint, CheckpointError, attention_side
from moemesh.model.config import ModelConfig
from moemesh.kernels.ops import Ops

from .model import Transformer, hf_to_local_name


def load_transformer(
    model_dir: str,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    ops: Ops | None = None,
) -> Transformer:
    """Every weight except the routed experts, renamed onto :class:`Transformer` and checked for completeness."""
    model = Transformer(cfg, dtype, ops)
    ckpt = Checkpoint(model_dir, cfg)
    wanted = {n: hf_to_local_name(n) for n in ckpt.names() if attention_side(n)}
    if cfg.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)  # the head is the embedding; a stored copy is ignored
    tensors = ckpt.load([n for n, local in wanted.items() if local is not None], dtype=dtype, progress=progress,
                        desc="loading attention weights")
    state = {wanted[n]: t for n, t in tensors.items()}
    expected = dict(model.state_dict())
    for name in [k for k in expected if k.endswith("gate.bias") and k not in state]:
        # Some exports omit an all-zero correction bias; zeros select exactly as the reference does.
        state[name] = torch.zeros_like(expected[name])
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{model_dir}: tensor for {name} has shape {tuple(tensor.shape)}, config implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
