"""Varied tiny DeepSeek configs, built and saved by transformers itself, for oracle tests."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    # Wide weights spread logits and routing scores, so greedy argmax and top-k
    # never sit on a near-tie that fp32 rounding could flip.
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
)

YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
    mscale=0.707, mscale_all_dim=0.707, beta_fast=32.0, beta_slow=1.0,
)

# name -> (arch, overrides). Together they cover: V2 greedy and group_limited_greedy, V3 noaux_tc
# with groups and a non-zero correction bias, q_lora_rank null and set, YaRN on V2 and V3,
# first_k_dense_replace 0/1/2, tied and untied embeddings, interleaved and half-split rope, top-1 normalised.
CONFIGS = {
    "v2_greedy_nolora_tied": ("v2", dict(num_hidden_layers=3, q_lora_rank=None, topk_method="greedy",
                                         first_k_dense_replace=1, tie_word_embeddings=True)),
    "v2_group_limited_lora": ("v2", dict(num_hidden_layers=4, q_lora_rank=24, topk_method="group_limited_greedy",
                                         n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=1.5)),
    "v2_yarn": ("v2", dict(num_hidden_layers=2, q_lora_rank=None, first_k_dense_replace=0, rope_parameters=YARN,
                           n_shared_experts=2)),
    "v3_noaux_groups_bias": ("v3", dict(num_hidden_layers=3, q_lora_rank=24, n_group=4, topk_group=2,
                                        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "v3_yarn_nolora": ("v3", dict(num_hidden_layers=3, q_lora_rank=None, n_group=2, topk_group=1,
                                  num_experts_per_tok=3, first_k_dense_replace=1, rope_parameters=YARN)),
    "v3_top1_normalized": ("v3", dict(num_hidden_layers=2, q_lora_rank=16, n_group=2, topk_group=1,
                                      num_experts_per_tok=1, first_k_dense_replace=1, norm_topk_prob=True)),
    "v3_halfsplit_rope_tied": ("v3", dict(num_hidden_layers=2, q_lora_rank=16, n_group=1, topk_group=1,
                                          first_k_dense_replace=0, rope_interleave=False, norm_topk_prob=False,
                                          tie_word_embeddings=True)),
    # V3.2 (DeepSeek Sparse Attention): index_topk below the prompts plus generation, so the indexer's
    # selection changes the result; 16 indexer heads make an exact-zero score tie (all relus 0) rare.
    "v32_sparse_topk8": ("v32", dict(num_hidden_layers=3, q_lora_rank=24, n_group=4, topk_group=2,
                                     first_k_dense_replace=1, index_topk=8, index_n_heads=16, index_head_dim=16)),
    "v32_yarn_topk12_tied": ("v32", dict(num_hidden_layers=2, q_lora_rank=16, n_group=2, topk_group=1,
                                         first_k_dense_replace=0, rope_parameters=YARN, index_topk=12,
                                         index_n_heads=16, index_head_dim=24, tie_word_embeddings=True)),
}


def build_hf_model(name: str, seed: int = 0, **changes):
    """``changes`` override the named config (e.g. a V3.2 ``index_topk`` past every context: dense)."""
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              DeepseekV32Config, DeepseekV32ForCausalLM)

    arch, overrides = CONFIGS[name]
    torch.manual_seed(seed)
    kwargs = {**_COMMON, **overrides, **changes}
    if arch == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs))
    else:
        v32 = arch == "v32"
        config = DeepseekV32Config(**kwargs) if v32 else DeepseekV3Config(**kwargs)
        model = (DeepseekV32ForCausalLM if v32 else DeepseekV3ForCausalLM)(config)
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:  # a non-zero bias, so selection differs from plain top-k
                gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()


def save_hf_model(name: str, out_dir: Path):
    model = build_hf_model(name)
    model.save_pretrained(out_dir)
    return model


def assert_prefill_logits_match(hf, engine, prompts: list[list[int]], tol: float = 1e-4) -> None:
    """Each prompt's prefill logits from moemesh's ``engine`` against transformers' ``hf``."""
    for prompt in prompts:
        ours = engine.prompt_logits(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def assert_greedy_tokens_match(hf, engine, prompts: list[list[int]], new_tokens: int) -> None:
    """The prompts batched in ``engine``, greedy: each one's tokens equal transformers' greedy generate alone."""
    from moemesh.sampling import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
