"""One MLA layer's decode step in one C call (kernels/cpu_mla_layer.py): the unfused CPU path of
attn_node/model.py's MLA.forward is its oracle, to the bit (output and the cache it writes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh.attn_node.model import AttnBatch, AttnGroup, Transformer
from moemesh.kernels import cpu_kernels
from moemesh.kernels.cpu_mla_layer import cpu_mla_layer
from moemesh.kernels.ops import _not_fused, select_ops
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import tiny_config_dict

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU kernels not built")
BLOCK = 4


def _model(arch: str, dtype: torch.dtype) -> Transformer:
    cfg = ModelConfig.from_dict(tiny_config_dict(arch=arch, hidden_size=64, layers=1, experts=4, experts_per_token=2,
                                                 kv_lora_rank=32, vocab_size=64))
    torch.manual_seed(0)
    model = Transformer(cfg, dtype=dtype, ops=select_ops("cpu"), compute_dtype=torch.float32)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape) * 0.2)
    return model


def _unfused(mla):
    """The same layer with the fused call off: the model runs its ops (the chain of C calls the fused one makes)."""
    mla.ops = dataclasses.replace(mla.ops, dense=dataclasses.replace(mla.ops.dense, mla_layer=_not_fused))
    return mla


def _decode_batch(context_lens: list[int], order: list[int], slots: int) -> AttnBatch:
    """One query per sequence; sequence b's query is row order[b] of the flat batch; blocks laid out reversed so the
    tables are not the identity."""
    B, S = len(context_lens), max(context_lens)
    n_blocks = -(-S // BLOCK)
    tables = torch.tensor([[slots // BLOCK - 1 - (b * n_blocks + j) for j in range(n_blocks)] for b in range(B)])
    ctx = torch.tensor(context_lens)
    key_pos = torch.arange(S)
    ctx_slots = tables[:, key_pos // BLOCK] * BLOCK + key_pos % BLOCK  # [B, S]
    token_index = torch.tensor(order).view(B, 1)
    out_rows = torch.empty(B, dtype=torch.int64)
    out_rows[token_index[:, 0]] = torch.arange(B)
    slot_mapping = torch.empty(B, dtype=torch.int64)
    slot_mapping[token_index[:, 0]] = ctx_slots[torch.arange(B), ctx - 1]
    positions = torch.empty(B, dtype=torch.int64)
    positions[token_index[:, 0]] = ctx - 1
    mask = (key_pos[None, None, :] <= (ctx - 1)[:, None, None]).unsqueeze(1)  # [B, 1, 1, S]
    group = AttnGroup(token_index, ctx_slots, mask, True, tables, ctx, BLOCK)
    return AttnBatch(positions, slot_mapping, (group,), out_rows)


def _run(model: Transformer, x, batch: AttnBatch, cache: torch.Tensor, fused: bool) -> torch.Tensor:
    mla = model.layers[0].attn
    if not fused:
        _unfused(mla)
    cos, sin = model.rotary.cos_sin(batch.positions)
    return mla(x, (model.rotary, cos, sin), batch, cache)


@needs_kernel
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])  # wq alone; wq_a, q_norm and wq_b
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_the_fused_layer_equals_the_unfused_ops(arch, dtype, interleave):
    lens, order = [5, 1, 9, 12, 3], [2, 0, 4, 1, 3]
    g = torch.Generator().manual_seed(1)
    fused_model, ref_model = _model(arch, dtype), _model(arch, dtype)
    for m in (fused_model, ref_model):
        m.rotary.interleave = interleave
    cfg = fused_model.cfg
    cache = torch.randn(64, cfg.kv_cache_dim, generator=g)
    x = torch.randn(len(lens), cfg.hidden_size, generator=g)
    batch = _decode_batch(lens, order, 64)
    fused_cache, ref_cache = cache.clone(), cache.clone()
    mla = fused_model.layers[0].attn
    cos, sin = fused_model.rotary.cos_sin(batch.positions)
    assert cpu_mla_layer(mla, x, (fused_model.rotary, cos, sin), batch, fused_cache.clone()) is not None
    got = _run(fused_model, x, batch, fused_cache, fused=True)
    ref = _run(ref_model, x, batch, ref_cache, fused=False)
    assert torch.equal(got, ref)
    assert torch.equal(fused_cache, ref_cache)
    assert not torch.equal(fused_cache, cache)  # the step's latent was stored


@needs_kernel
@pytest.mark.parametrize("swap", ["data", "parameter"])
def test_weights_swapped_after_a_step_are_the_ones_computed_with(swap):
    # the layer's weight struct is kept per module: a loader that swaps a tensor (or its storage) must be seen
    lens, order = [5, 1, 9], [1, 2, 0]
    fused_model, ref_model = _model("deepseek_v3", torch.bfloat16), _model("deepseek_v3", torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(64, fused_model.cfg.kv_cache_dim, generator=g)
    x = torch.randn(len(lens), fused_model.cfg.hidden_size, generator=g)
    batch = _decode_batch(lens, order, 64)
    _run(fused_model, x, batch, cache.clone(), fused=True)  # the struct is built and kept
    for model in (fused_model, ref_model):
        for name in ("wq_b", "wo", "kv_norm"):
            mod = getattr(model.layers[0].attn, name)
            new = torch.randn(mod.weight.shape, generator=torch.Generator().manual_seed(4)).to(mod.weight.dtype)
            if swap == "data":
                mod.weight.data = new
            else:
                mod.weight = torch.nn.Parameter(new, requires_grad=False)
    fused_cache, ref_cache = cache.clone(), cache.clone()
    got = _run(fused_model, x, batch, fused_cache, fused=True)
    assert torch.equal(got, _run(ref_model, x, batch, ref_cache, fused=False))
    assert torch.equal(fused_cache, ref_cache)


@needs_kernel
def test_a_rows_bits_do_not_depend_on_its_batch():
    model = _model("deepseek_v2", torch.bfloat16)
    lens = [7, 2, 11, 4]
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(64, model.cfg.kv_cache_dim, generator=g)
    x = torch.randn(len(lens), model.cfg.hidden_size, generator=g)
    whole = _run(model, x, _decode_batch(lens, list(range(4)), 64), cache.clone(), fused=True)
    for b in range(4):
        alone = _decode_batch(lens, list(range(4)), 64)  # the same tables; then keep sequence b only
        grp = alone.groups[0]
        one = AttnBatch(alone.positions[b:b + 1], alone.slot_mapping[b:b + 1],
                        (AttnGroup(torch.zeros(1, 1, dtype=torch.int64), grp.ctx_slots[b:b + 1, :lens[b]],
                                   grp.mask[b:b + 1, ..., :lens[b]], True, grp.block_tables[b:b + 1].contiguous(),
                                   grp.context_lens[b:b + 1], BLOCK),), torch.zeros(1, dtype=torch.int64))
        assert torch.equal(_run(model, x[b:b + 1], one, cache.clone(), fused=True), whole[b:b + 1]), b


@needs_kernel
def test_bad_indices_raise_and_other_steps_are_not_taken():
    model = _model("deepseek_v2", torch.float32)
    mla, cfg = model.layers[0].attn, model.cfg
    x = torch.randn(2, cfg.hidden_size)
    cache = torch.zeros(64, cfg.kv_cache_dim)

    def call(batch, x=x):
        cos, sin = model.rotary.cos_sin(batch.positions)
        return cpu_mla_layer(mla, x, (model.rotary, cos, sin), batch, cache)

    batch = _decode_batch([3, 4], [0, 1], 64)
    batch.slot_mapping[1] = 64  # past the cache
    with pytest.raises(IndexError, match="slot_mapping"):
        call(batch)
    batch = _decode_batch([3, 4], [0, 1], 64)
    batch.groups[0].token_index[1, 0] = 2  # past the batch
    with pytest.raises(IndexError, match="token_index"):
        call(batch)
    batch = _decode_batch([3, 4], [0, 1], 64)
    batch.groups[0].block_tables[0, 0] = 16  # its slots are past the cache
    with pytest.raises(IndexError, match="block_tables"):
        call(batch)
    batch = _decode_batch([3, 4], [0, 1], 64)
    batch.out_rows[0] = -1
    with pytest.raises(IndexError, match="out_rows"):
        call(batch)
    batch = _decode_batch([3, 4], [0, 1], 64)
    assert call(batch, x.double()) is None  # not fp32 activations: the model's own ops
    prefill = _decode_batch([3, 4], [0, 1], 64)
    prefill = dataclasses.replace(prefill, groups=(dataclasses.replace(prefill.groups[0], absorbed=False),))
    assert call(prefill) is None
