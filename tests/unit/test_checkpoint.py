"""Checkpoint reading: layouts, role-filtered loads that touch only what they need, FP8 block dequant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moemesh.model.checkpoint as ck
from moemesh.model.checkpoint import (
    Checkpoint,
    CheckpointError,
    attention_side,
    dequantize_fp8_blockwise,
    expert_tensor_names,
    is_routed_expert,
    parse_expert,
    quantize_fp8_blockwise,
    write_dequantized,
    write_fp8_twin,
)
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import write_tiny_checkpoint

# hidden 96 makes several weight shapes (e.g. kv_a_proj 48 rows, experts 48 wide) not multiples of 32.
TINY = dict(arch="deepseek_v3", hidden_size=96, layers=3, experts=8, experts_per_token=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), **TINY)


def open_ckpt(d: Path) -> Checkpoint:
    return Checkpoint(d, ModelConfig.from_dir(d))


def reshard(src: Path, dst: Path, n: int, *, index: bool = True, extra: dict | None = None) -> Path:
    """Split a single-file checkpoint into n shards by hand (optionally without an index)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    tensors.update(extra or {})
    names = list(tensors)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = names[i::n]
        save_file({k: tensors[k] for k in part}, dst / file)
        weight_map.update({k: file for k in part})
    if index:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


# ---- role filters -------------------------------------------------------------


def test_role_filters():
    e = "model.layers.3.mlp.experts.17.down_proj.weight"
    assert is_routed_expert(e) and not attention_side(e) and parse_expert(e) == (3, 17)
    for name in [
        "model.layers.3.mlp.shared_experts.down_proj.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.experts.17.down_proj.weight_scale_inv",
        "lm_head.weight",
    ]:
        assert not is_routed_expert(name) and attention_side(name) and parse_expert(name) is None
    assert expert_tensor_names(2, 5) == [
        "model.layers.2.mlp.experts.5.gate_proj.weight",
        "model.layers.2.mlp.experts.5.up_proj.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight",
    ]
    assert all(parse_expert(n) == (2, 5) for n in expert_tensor_names(2, 5))


# ---- layouts --------------------------------------------------------------------


def test_single_sharded_and_unindexed_load_identically(tiny, tmp_path):
    ref = open_ckpt(tiny).load(lambda n: True, dtype=torch.float32)
    assert set(ref) == set(load_file(tiny / "model.safetensors"))
    for index in (True, False):
        d = reshard(tiny, tmp_path / f"sharded-{index}", 5, index=index)
        c = open_ckpt(d)
        assert c.names() == sorted(ref)
        got = c.load(c.names(), dtype=torch.float32)
        assert list(got) == c.names()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_names_skip_mtp_layer_and_scales(tiny, tmp_path):
    mtp = "model.layers.3.embed_tokens.weight"  # V3's MTP layer sits past num_hidden_layers
    d = reshard(tiny, tmp_path / "mtp", 2, extra={mtp: torch.ones(4, 4)})
    c = open_ckpt(d)
    assert mtp not in c.names() and all(not n.startswith("model.layers.3.") for n in c.names())
    assert mtp not in c.load(lambda n: True, dtype=torch.float32)
    assert torch.equal(c.load([mtp], dtype=torch.float32)[mtp], torch.ones(4, 4))  # still loadable by name
    fp8 = open_ckpt(write_fp8_twin(tiny, tmp_path / "fp8", block=(32, 32)))
    assert not any(n.endswith("_scale_inv") for n in fp8.names())
    assert fp8.names() == open_ckpt(tiny).names()


def test_dtype_rule_keeps_router_fp32(tiny):
    got = open_ckpt(tiny).load(lambda n: True, dtype=torch.bfloat16)
    for name, t in got.items():
        router = name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
        assert t.dtype == (torch.float32 if router else torch.bfloat16), name
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in got


def test_errors_name_what_is_missing(tiny, tmp_path):
    c = open_ckpt(tiny)
    with pytest.raises(CheckpointError, match="model.layers.0.nope.weight"):
        c.load(["lm_head.weight", "model.layers.0.nope.weight"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match="request the weight itself"):
        c.load(["lm_head.weight_scale_inv"], dtype=torch.float32)
    d = reshard(tiny, tmp_path / "lost", 3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        open_ckpt(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no weights"):
        Checkpoint(empty, c.config)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "absent", c.config)


# ---- role-filtered loading touches only what it needs -----------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records every file the checkpoint module opens, by header read or by safe_open."""
    opened: list[str] = []
    real_open, real_header = ck.safe_open, ck._read_header

    def spy_open(path, *a, **kw):
        opened.append(Path(path).name)
        return real_open(path, *a, **kw)

    def spy_header(path):
        opened.append(Path(path).name)
        return real_header(path)

    monkeypatch.setattr(ck, "safe_open", spy_open)
    monkeypatch.setattr(ck, "_read_header", spy_header)
    return opened


def test_expert_subset_opens_only_its_shards(tiny, tmp_path, spy):
    d = write_fp8_twin(tiny, tmp_path / "fp8", block=(32, 32), shard_max_bytes=20_000)
    all_shards = {p.name for p in d.glob("*.safetensors")}
    assert len(all_shards) > 10
    spy.clear()
    c = open_ckpt(d)
    assert spy == []  # the index alone locates tensors
    pairs = [(1, 3), (2, 0)]
    wanted = [n for layer, e in pairs for n in expert_tensor_names(layer, e)]
    got = c.load(wanted, dtype=torch.float32)
    assert list(got) == wanted
    touched = set(spy)
    assert touched == set(c.files_for(wanted)) and len(touched) <= 6 < len(all_shards)
    ref = open_ckpt(tiny).load(wanted, dtype=torch.float32)
    for k in wanted:  # FP8 round trip of real weights: close, not equal
        assert (got[k] - ref[k]).abs().max() <= ref[k].abs().max() / 8


def test_attention_side_loads_everything_but_routed_experts(tiny, tmp_path, spy):
    d = reshard(tiny, tmp_path / "s", 4)
    spy.clear()
    c = open_ckpt(d)
    got = c.load(attention_side, dtype=torch.float32)
    assert not any(is_routed_expert(n) for n in got)
    assert set(got) | {n for n in c.names() if is_routed_expert(n)} == set(c.names())
    assert sorted(spy) == sorted(2 * [p.name for p in d.glob("*.safetensors")])  # a header read + a safe_open each


def test_shard_with_only_experts_is_never_opened(tiny, tmp_path, spy):
    tensors = load_file(tiny / "model.safetensors")
    d = tmp_path / "split"
    d.mkdir()
    (d / "config.json").write_text((tiny / "config.json").read_text())
    experts = {k: v for k, v in tensors.items() if is_routed_expert(k)}
    rest = {k: v for k, v in tensors.items() if not is_routed_expert(k)}
    save_file(experts, d / "experts.safetensors")
    save_file(rest, d / "rest.safetensors")
    wm = {k: "experts.safetensors" for k in experts} | {k: "rest.safetensors" for k in rest}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    c = open_ckpt(d)
    c.load(attention_side, dtype=torch.float32)
    assert set(spy) == {"rest.safetensors"}
    spy.clear()
    got = c.load(expert_tensor_names(2, 7), dtype=torch.float32)
    assert set(spy) == {"experts.safetensors"} and len(got) == 3


def test_large_load_with_progress_bar(tiny, monkeypatch):
    monkeypatch.setattr(ck, "PROGRESS_MIN_TENSORS", 0)
    got = open_ckpt(tiny).load(lambda n: True, dtype=torch.float32, progress=True, desc="test")
    assert len(got) == len(open_ckpt(tiny).names())


# ---- FP8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,block", [((70, 45), (16, 16)), ((64, 64), (32, 32)), ((33, 100), (32, 32))])
def test_fp8_quantize_dequantize_error_is_small(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[:16, :16] = 0.0  # an all-zero block must not divide by zero
    q, s = quantize_fp8_blockwise(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    back = dequantize_fp8_blockwise(q, s, block)
    assert torch.isfinite(back).all() and torch.equal(back[:16, :16], torch.zeros(16, 16))
    # e4m3 keeps 3 mantissa bits: relative error <= 1/16 of each value (plus subnormal slack).
    assert ((back - w).abs() <= w.abs() / 16 + s.max() * 2**-9).all()
    assert (back - w).abs().mean() < 0.02


@pytest.mark.parametrize("shard_max_bytes", [None, 30_000])
def test_fp8_twin_loads_exactly_like_its_dequantized_twin(tiny, tmp_path, shard_max_bytes):
    fp8 = write_fp8_twin(tiny, tmp_path / "fp8", block=(32, 32), shard_max_bytes=shard_max_bytes)
    deq = write_dequantized(fp8, tmp_path / "deq")
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
    }
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    assert (fp8 / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (shard_max_bytes is not None) == (fp8 / "model.safetensors.index.json").exists()

    stored = {}
    for f in fp8.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            stored.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == "F8_E4M3"  # 48 rows: partial blocks
    assert stored["model.layers.1.mlp.experts.0.down_proj.weight"] == "F8_E4M3"  # 48 cols: partial blocks
    for kept in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"]:
        assert stored[kept] == "F32" and kept + "_scale_inv" not in stored

    a, b = open_ckpt(fp8), open_ckpt(deq)
    assert a.fp8_block == (32, 32)
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.load(lambda n: True, dtype=dtype), b.load(lambda n: True, dtype=dtype)
        assert list(x) == list(y)
        assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def test_fp8_default_block_when_config_has_no_quantization(tmp_path):
    w = torch.randn(200, 130)
    q, s = quantize_fp8_blockwise(w)  # 128x128: 2x2 blocks, partial at the edges
    d = write_tiny_checkpoint(tmp_path / "t", arch="deepseek_v2")
    save_file({"lm_head.weight": q, "lm_head.weight_scale_inv": s}, d / "model.safetensors")
    got = open_ckpt(d).load(["lm_head.weight"], dtype=torch.float32)["lm_head.weight"]
    assert torch.equal(got, dequantize_fp8_blockwise(q, s, (128, 128)))


def test_bad_fp8_scale_shape_or_missing_scale(tmp_path):
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    d = write_tiny_checkpoint(tmp_path / "t", arch="deepseek_v2", quantization_config=quant)
    q, s = quantize_fp8_blockwise(torch.randn(40, 40), (16, 16))  # scales 3x3
    save_file({"lm_head.weight": q, "lm_head.weight_scale_inv": s[:2]}, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head.weight_scale_inv has shape \[2, 3\].*needs \[3, 3\]"):
        open_ckpt(d).load(["lm_head.weight"], dtype=torch.float32)
    save_file({"lm_head.weight": q}, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no lm_head.weight_scale_inv"):
        open_ckpt(d).load(["lm_head.weight"], dtype=torch.float32)


def test_dequantized_twin_loads_in_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    deq = write_dequantized(write_fp8_twin(tiny, tmp_path / "fp8", block=(32, 32)), tmp_path / "deq")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(deq, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_keep_fp8_returns_the_stored_e4m3_and_scales(tiny, tmp_path):
    fp8 = write_fp8_twin(tiny, tmp_path / "fp8", block=(32, 32))
    ckpt = open_ckpt(fp8)
    names = [*expert_tensor_names(1, 3), "model.layers.1.mlp.gate.weight", "model.norm.weight"]
    kept = ckpt.load(names, dtype=torch.bfloat16, keep_fp8=True)
    deq = ckpt.load(names, dtype=torch.float32)
    for name in expert_tensor_names(1, 3):
        t = kept[name]
        assert isinstance(t, ck.Fp8Tensor) and t.block == (32, 32)
        assert t.q.dtype == torch.float8_e4m3fn and t.scale_inv.dtype == torch.float32
        assert torch.equal(t.dequantize(), deq[name])
    assert kept["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router rule still holds
    assert kept["model.norm.weight"].dtype == torch.bfloat16  # never quantized: the dtype rule as usual
