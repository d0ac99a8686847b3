"""A bf16 checkpoint on CPU: moemesh keeps the weights bf16 and computes in fp32; transformers runs fp32.

``--dtype auto`` on CPU keeps a bf16 checkpoint bf16 in memory (half the bytes of an fp32 copy) with fp32
activations and accumulation (moemesh/devices.py). bf16 -> fp32 is exact, so this is the same arithmetic
as transformers loading the checkpoint in fp32, up to summation order: logits agree to fp32 tolerance and
greedy tokens are identical.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moemesh.attn_node.engine import EngineConfig
from moemesh.kernels import cpu_kernels
from moemesh.launch.embedded import build_local

from .hf_models import assert_greedy_tokens_match, assert_prefill_logits_match, build_hf_model

pytestmark = pytest.mark.oracle

NEW_TOKENS = 24


@pytest.fixture(scope="module", params=["v2_group_limited_lora", "v3_noaux_groups_bias"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"{request.param}-bf16")
    build_hf_model(request.param).to(torch.bfloat16).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mesh = build_local(path, "auto", EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8),
                       progress=False, device="cpu")
    return hf, mesh


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (6, 19)]


def test_weights_stay_bf16_and_the_math_is_fp32(pair):
    _, mesh = pair
    model = mesh.engine.runner.model
    assert mesh.dtype == torch.bfloat16
    assert model.compute_dtype == torch.float32
    assert model.layers[0].attn.wo.weight.dtype == torch.bfloat16
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[0].attn_norm.weight.dtype == torch.float32
    shard = mesh.engine.backend.shard
    assert shard.dtype == torch.float32 and shard.weight_dtype == torch.bfloat16
    assert all(le.w13.dtype == torch.bfloat16 for le in shard._layers.values())
    assert mesh.engine.runner.kv_caches[0].dtype == torch.float32


def test_prefill_logits_match_fp32_transformers(pair):
    hf, mesh = pair
    assert_prefill_logits_match(hf, mesh.engine, _prompts(mesh.cfg.vocab_size))


def test_batched_greedy_tokens_match_fp32_transformers(pair):
    hf, mesh = pair
    assert_greedy_tokens_match(hf, mesh.engine, _prompts(mesh.cfg.vocab_size), NEW_TOKENS)


@pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.amx_ready()),
                    reason="no AMX-BF16 on this CPU, or the kernels were built without it")
def test_prefill_sized_batches_on_amx_match_fp32_transformers(tmp_path):
    # Long prompts in one chunk give every routed expert 12+ rows, so the bf16 experts run on AMX tiles
    # (kernels/cpu_amx.c): the tokens and logits still equal transformers' fp32 run.
    build_hf_model("v3_noaux_groups_bias").to(torch.bfloat16).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mesh = build_local(tmp_path, "auto", EngineConfig(block_size=4, max_num_batched_tokens=512, max_num_seqs=4),
                       progress=False, device="cpu")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, mesh.cfg.vocab_size, (n,), generator=gen).tolist() for n in (97, 150)]
    before = cpu_kernels.amx_layers_run()
    assert_prefill_logits_match(hf, mesh.engine, prompts)
    assert cpu_kernels.amx_layers_run() > before
    assert_greedy_tokens_match(hf, mesh.engine, prompts, 8)
