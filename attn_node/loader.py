"""Build the attention-side Transformer from a checkpoint directory (never reading routed experts).

The model comes back with no expert backend: the caller attaches one (attn_node/attach.py).
"""

from __future__ import annotations

import torch

from moemesh.devices import compute_dtype
from moemesh.model.checkpoint import Checkpoint, CheckpointError, attention_side
from moemesh.model.config import ModelConfig
from moemesh.kernels.ops import Ops, select_ops

from .model import Rotary, Transformer, hf_to_local_name


def load_transformer(
    model_dir: str,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    ops: Ops | None = None,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Every weight except the routed experts, renamed onto :class:`Transformer`, checked, on ``device``.

    The module is built on ``meta`` (shapes, no memory) and the checkpoint's tensors are assigned to it,
    each copied to ``device`` once as it is read: nothing is allocated twice. ``dtype`` is the weights';
    activations run in :func:`moemesh.devices.compute_dtype` (fp32 on CPU).
    """
    device = torch.device(device)
    model = Transformer(cfg, dtype, ops or select_ops(device), device="meta",
                        compute_dtype=compute_dtype(dtype, device))
    ckpt = Checkpoint(model_dir, cfg)
    wanted = {n: hf_to_local_name(n) for n in ckpt.names() if attention_side(n)}
    if cfg.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)  # the head is the embedding; a stored copy is ignored
    tensors = ckpt.load([n for n, local in wanted.items() if local is not None], dtype=dtype, progress=progress,
                        desc="loading attention weights")
    expected = dict(model.state_dict())  # meta tensors: names, shapes and dtypes
    state = {}
    for name in list(tensors):
        local, tensor = wanted[name], tensors.pop(name)  # pop: the host copy goes as soon as it is on the device
        if local in expected and tensor.shape != expected[local].shape:
            raise CheckpointError(
                f"{model_dir}: tensor for {local} has shape {tuple(tensor.shape)}, config implies "
                f"{tuple(expected[local].shape)}"
            )
        # the module's dtype per tensor (norms in the compute dtype, the gate in fp32): exact widenings
        state[local] = tensor.to(device, expected[local].dtype if local in expected else tensor.dtype)
    for name in [k for k in expected if k.endswith("gate.bias") and k not in state]:
        # Some exports omit an all-zero correction bias; zeros select exactly as the reference does.
        state[name] = torch.zeros(expected[name].shape, dtype=expected[name].dtype, device=device)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = Rotary(cfg, model.dense).to(device)  # a buffer, not in the state dict: made on meta above
    return model.eval()
