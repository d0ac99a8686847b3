"""The dense layers' calls are chosen once, by the weights' device (kernels/ops.py ``Ops.dense``), and the CPU's
fused C calls compute what the torch ops the other devices run compute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moemesh.attn_node.attach import attach_experts
from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.attn_node.model import Linear, MLP, RMSNorm, Transformer
from moemesh.kernels import cpu_kernels
from moemesh.kernels.ops import CPU_DENSE, TORCH_DENSE, select_ops
from moemesh.sampling import SamplingParams

from .test_engine import prompts_of, tiny  # noqa: F401  (the session's tiny model)


def test_the_dense_calls_follow_the_weights_device():
    assert select_ops("cpu").dense is CPU_DENSE
    assert select_ops("cpu", "reference").dense is CPU_DENSE  # plain torch cannot run fp32 rows over bf16 weights
    assert select_ops("cuda", "reference").dense is TORCH_DENSE  # the references on CPU, the weights on CUDA


def test_every_dense_module_gets_the_models_calls(tiny):  # noqa: F811
    modules = [m for m in tiny.model.modules() if isinstance(m, (Linear, RMSNorm, MLP))]
    assert modules and all(m.dense is CPU_DENSE for m in modules)
    assert tiny.model.rotary.dense is CPU_DENSE and tiny.model.dense is CPU_DENSE


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: CPU_DENSE falls back to these torch ops")
def test_the_cpu_calls_give_the_torch_ops_tokens_and_logits(tiny):  # noqa: F811
    on_torch = Transformer(tiny.cfg, ops=replace(select_ops("cpu"), dense=TORCH_DENSE))
    on_torch.load_state_dict(tiny.model.state_dict(), strict=True)
    attach_experts(on_torch.eval(), tiny.backend)
    prompts = prompts_of([3, 5, 4, 6], seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64)
    fused = Engine(tiny.model, tiny.cfg, config, backend=tiny.backend).generate(prompts, params)
    plain = Engine(on_torch, tiny.cfg, config, backend=tiny.backend).generate(prompts, params)
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
    for a, b in zip(fused, plain):  # the chosen tokens' logprobs: only the summation order differs
        got = torch.tensor([e.logprob for e in a.logprobs])
        want = torch.tensor([e.logprob for e in b.logprobs])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
