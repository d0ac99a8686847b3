"""Tiny random checkpoints: transformers loads them exactly; same seed, same bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moemesh.model.checkpoint import Checkpoint
from moemesh.model.config import ConfigError, ModelConfig
from moemesh.model.tiny import write_tiny_checkpoint

ARCHS = ["deepseek_v2", "deepseek_v3", "deepseek_v32"]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_with_no_missing_or_unexpected_keys(tmp_path, transformers, arch):
    d = write_tiny_checkpoint(tmp_path / arch, arch=arch)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert type(model).__name__ == json.loads((d / "config.json").read_text())["architectures"][0]
    assert not any(info.values()), info
    ours = load_file(d / "model.safetensors")
    sd = model.state_dict()
    # transformers fuses experts in memory: check one fused block against the stored tensors.
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"][3]
    e3 = "model.layers.1.mlp.experts.3."
    assert torch.equal(gate_up, torch.cat([ours[e3 + "gate_proj.weight"], ours[e3 + "up_proj.weight"]]))
    assert torch.equal(sd["model.layers.2.self_attn.kv_b_proj.weight"], ours["model.layers.2.self_attn.kv_b_proj.weight"])
    if arch == "deepseek_v32":  # the indexer's tensors load under transformers' names, LayerNorm bias included
        k_norm_bias = "model.layers.2.self_attn.indexer.k_norm.bias"
        assert torch.equal(sd[k_norm_bias], ours[k_norm_bias]) and ours[k_norm_bias].abs().min() > 0
    if arch in ("deepseek_v3", "deepseek_v32"):
        bias = ours["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().min() > 0
        assert torch.equal(sd["model.layers.1.mlp.gate.e_score_correction_bias"], bias)
    # Well-spread logits: greedy decoding has a clear winner at every step.
    ids = torch.tensor([[0, 5, 77, 300, 12]])
    with torch.no_grad():
        top2 = model(ids).logits[0].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    # transformers' own layout of the same config parses to the same ModelConfig.
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "rope_parameters" in saved and "dtype" in saved
    assert ModelConfig.from_dir(tmp_path / "saved") == ModelConfig.from_dir(d)


def test_tokenizer_loads_in_transformers(tmp_path, transformers):
    d = write_tiny_checkpoint(tmp_path, arch="deepseek_v2")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert len(hf) == ModelConfig.from_dir(d).vocab_size
    assert hf.convert_ids_to_tokens([0, 1]) == ["<s>", "</s>"]


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_per_seed(tmp_path, arch):
    a = write_tiny_checkpoint(tmp_path / "a", arch=arch, seed=7)
    b = write_tiny_checkpoint(tmp_path / "b", arch=arch, seed=7)
    c = write_tiny_checkpoint(tmp_path / "c", arch=arch, seed=8)
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_config_layout_and_defaults(tmp_path):
    v2 = json.loads((write_tiny_checkpoint(tmp_path / "v2") / "config.json").read_text())
    v3 = json.loads((write_tiny_checkpoint(tmp_path / "v3", arch="deepseek_v3") / "config.json").read_text())
    assert (v2["topk_method"], v2["scoring_func"], v2["q_lora_rank"], v2["norm_topk_prob"]) == ("greedy", "softmax", None, False)
    assert (v3["topk_method"], v3["scoring_func"], v3["n_group"], v3["topk_group"]) == ("noaux_tc", "sigmoid", 4, 2)
    assert v3["routed_scaling_factor"] == 2.5 and v3["rope_interleave"] is True and v3["q_lora_rank"] == 64
    for cfg in (v2, v3):
        assert cfg["torch_dtype"] == "float32" and cfg["rope_scaling"] is None and cfg["first_k_dense_replace"] == 1
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (0, 1, 512)


def test_overrides_and_dtype(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0, "mscale_all_dim": 1.0}
    d = write_tiny_checkpoint(
        tmp_path, arch="deepseek_v3", dtype="bfloat16", q_lora_rank=None, rope_scaling=yarn, layers=2, experts=8
    )
    c = ModelConfig.from_dir(d)
    assert c.q_lora_rank is None and c.yarn is not None and c.dtype == "bfloat16" and c.n_routed_experts == 8
    stored = load_file(d / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in stored and "model.layers.0.self_attn.q_a_proj.weight" not in stored
    assert stored["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    names = Checkpoint(d, c).names()
    assert sum(n.endswith("experts.0.up_proj.weight") for n in names) == 1  # one MoE layer of two
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        write_tiny_checkpoint(tmp_path / "bad", num_experts_per_tok=99)
    with pytest.raises(ValueError, match="arch"):
        write_tiny_checkpoint(tmp_path / "bad", arch="llama")
