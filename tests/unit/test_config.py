"""ModelConfig: both config.json layouts load to the same config; every bad field is named in the error."""

from __future__ import annotations

import copy
import json

import pytest

from moemesh.model.config import ConfigError, ModelConfig, QuantConfig, YarnScaling
from moemesh.model.tiny import tiny_config_dict

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def published(arch: str = "deepseek_v3", **extra) -> dict:
    d = tiny_config_dict(arch=arch)
    d.update(extra)
    return d


def transformers5(d: dict) -> dict:
    """The same config as transformers 5 writes it: rope_parameters, dtype, no V3 routing names."""
    t = copy.deepcopy(d)
    rope = dict(t.pop("rope_scaling") or {"rope_type": "default"})
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = t.pop("rope_theta")
    t["rope_parameters"] = rope
    t["dtype"] = t.pop("torch_dtype")
    if t["model_type"] == "deepseek_v3":
        t.pop("topk_method")
        t.pop("scoring_func")
    return t


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("rope", [None, YARN])
def test_both_layouts_load_identically(arch, rope):
    d = published(arch, rope_scaling=rope, rope_theta=50000.0, torch_dtype="bfloat16")
    a, b = ModelConfig.from_dict(d), ModelConfig.from_dict(transformers5(d))
    assert a == b
    assert a.dtype == "bfloat16" and a.rope_theta == 50000.0
    if rope:
        assert a.yarn == YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
        assert a.softmax_scale > a.qk_head_dim**-0.5
    else:
        assert a.yarn is None


def test_v3_defaults_and_derived_sizes():
    c = ModelConfig.from_dict(published("deepseek_v3"))
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    assert c.kv_cache_dim == c.kv_lora_rank + c.qk_rope_head_dim
    assert c.moe_layers == (1, 2)
    assert c.eos_token_ids == (1,) and c.bos_token_id == 0
    assert c.quant is None


def test_from_dir_and_quant(tmp_path):
    d = published(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 32]})
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_dir(tmp_path).quant == QuantConfig(block_size=(16, 32))
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


BAD = [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"vocab_size": "512"}, "vocab_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"hidden_size": 1.5}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"topk_method": "random"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"torch_dtype": "float64"}, "torch_dtype"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"n_group": 8, "topk_group": 1}, "topk_group"),
    ({"n_group": 16, "topk_group": 4}, "n_group"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"eos_token_id": 9999}, "eos_token_id"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope"),
    ({"rope_scaling": {"type": "yarn"}}, "factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_field_is_named(change, field):
    d = published("deepseek_v3", **change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(d)


def test_missing_required_field_is_named():
    d = published()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        ModelConfig.from_dict(d)


def test_v32_reads_the_indexer_fields_and_sizes_its_cache_beside_the_latent():
    d = published("deepseek_v3", model_type="deepseek_v32", index_topk=2048, index_n_heads=64, index_head_dim=128,
                  rope_interleave=False)
    c = ModelConfig.from_dict(d)
    assert (c.arch, c.index_topk, c.index_n_heads, c.index_head_dim) == ("deepseek_v32", 2048, 64, 128)
    assert c.has_indexer and c.index_cache_dim == 128 and c.cache_row_dim == c.kv_cache_dim + 128
    assert c.rope_interleave  # transformers' V3.2 always rotates MLA's rope interleaved
    assert c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid"  # V3's routing
    v3 = ModelConfig.from_dict(published("deepseek_v3"))
    assert not v3.has_indexer and v3.index_cache_dim == 0 and v3.cache_row_dim == v3.kv_cache_dim


@pytest.mark.parametrize("change,field", [
    ({"index_topk": 0}, "index_topk"), ({"index_n_heads": "8"}, "index_n_heads"),
    ({"index_head_dim": 4}, "index_head_dim"), ({"q_lora_rank": None}, "q_lora_rank"),
])
def test_v32_bad_indexer_field_is_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(published("deepseek_v3", model_type="deepseek_v32", **change))
