"""The attention side's step on fake CUDA tensors: no CPU tensor and no host read inside it.

Every test builds the model (weights by torch.empty), the engine's runner and its latent caches on a fake
``cuda`` device (tests/fake_cuda.py) and audits one step: prefill chunks (naive or absorbed MLA), decode
(absorbed: the paged decode op; V3.2 past index_topk: the top-k rows), both in one step, the sampler's tensor part and the load counts. A CPU
tensor meeting a CUDA one, a CPU op, or a host read (``.item()``, ``.tolist()``, a boolean-mask index)
fails them; the step's inputs arrive as one upload.

The ops are the ones the model gets on CUDA, ``select_ops("cuda")``: the Triton kernels registered as torch
custom ops (kernels/library.py), whose fake implementations check shapes and devices; the torch code
around them (the fused-MoE alignment, the decode split/merge) runs for real in the fake mode.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

from moemesh.attn_node.attach import attach_experts
from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.attn_node.load_stats import LoadStats
from moemesh.attn_node.model import Transformer
from moemesh.attn_node.logprobs import logprob_block, pack
from moemesh.attn_node.sampler import sample_step, sample_tokens
from moemesh.expert_backend import StaticExpertBackend
from moemesh.kernels.ops import Ops, select_ops
from moemesh.model.config import ModelConfig
from moemesh.model.tiny import tiny_config_dict
from moemesh.sampling import SamplingParams
from tests.fake_cuda import CUDA, fake_cuda

pytestmark = [pytest.mark.unit, pytest.mark.fake_cuda]

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def device_ops() -> Ops:
    """What the model gets on CUDA: the Triton kernels, as torch custom ops with fake implementations."""
    return select_ops(CUDA)


class ZeroExperts(StaticExpertBackend):
    """Routed experts that add nothing, computed where the rows are (device-generic)."""

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        return torch.zeros_like(x)

    def combine(self, handle):
        return handle


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3", "deepseek_v32"])
def cfg(request) -> ModelConfig:
    d = tiny_config_dict(arch=request.param, hidden_size=64, layers=2, experts=4, experts_per_token=2,
                         kv_lora_rank=32, vocab_size=64)
    if request.param == "deepseek_v32":
        d["index_topk"] = 4  # below every context here: the indexer's sparse prefill and decode run
    return ModelConfig.from_dict(d)


def build_engine(cfg: ModelConfig, mla_impl: str = "auto") -> tuple[Engine, LoadStats]:
    """Inside fake_cuda: the model, its load counts and the engine (runner, caches) on cuda."""
    model = Transformer(cfg, torch.float32, device_ops(), device="cuda").eval()
    stats = LoadStats(cfg.moe_layers, cfg.n_routed_experts, device=CUDA)
    backend = ZeroExperts()
    config = EngineConfig(block_size=4, kv_cache_tokens=64, max_num_seqs=4, max_num_batched_tokens=8,
                          mla_impl=mla_impl)
    return Engine(attach_experts(model, backend, stats), cfg, config, backend=backend), stats


def audited_step(fake, engine: Engine):
    """Schedule on the host, run the model and sample under the audit; apply stand-in tokens after."""
    scheduled = engine.scheduler.schedule()
    sampling = [item.seq for item in scheduled if item.samples]
    with fake.audit() as audit:
        logits = engine.runner.run(scheduled)
        tokens = sample_tokens(logits, [s.params for s in sampling], [s.generator for s in sampling])
    engine.scheduler.postprocess(scheduled, [2] * len(sampling))  # no values on fake tensors: any ids do
    return scheduled, logits, tokens, audit


def assert_on_device(audit, logits, tokens, rows: int, vocab: int) -> None:
    assert audit.cpu_ops == []
    assert len(audit.uploads) == 1, audit.uploads  # the step's inputs, packed into one copy
    assert logits.device == CUDA and tuple(logits.shape) == (rows, vocab) and logits.dtype == torch.float32
    assert tokens.device == CUDA and tuple(tokens.shape) == (rows,)


def test_the_model_and_its_caches_are_built_on_the_device(cfg):
    with fake_cuda():
        engine, _ = build_engine(cfg)
        model = engine.runner.model
        tensors = [*model.parameters(), *model.buffers(), *engine.runner.kv_caches]
        assert model.device == CUDA and engine.device == CUDA
        assert {t.device for t in tensors} == {CUDA}


@pytest.mark.parametrize("mla_impl", ["auto", "naive", "absorbed"])
def test_prefill_then_decode_steps_stay_on_the_device(cfg, mla_impl):
    with fake_cuda() as fake:
        engine, _ = build_engine(cfg, mla_impl)
        engine.add_request([3, 4, 5, 6, 7], GREEDY)
        engine.add_request(list(range(3, 15)), GREEDY)  # 12 tokens: chunked across steps under a budget of 8

        scheduled, logits, tokens, audit = audited_step(fake, engine)  # prefill: 5 + a 3-token chunk
        assert [item.num_tokens for item in scheduled] == [5, 3]
        assert_on_device(audit, logits, tokens, 1, cfg.vocab_size)

        scheduled, logits, tokens, audit = audited_step(fake, engine)  # a decode group and a prefill chunk
        assert [item.num_tokens for item in scheduled] == [1, 7]
        assert_on_device(audit, logits, tokens, 1, cfg.vocab_size)

        audited_step(fake, engine)  # the last chunk (2 tokens) and a decode
        scheduled, logits, tokens, audit = audited_step(fake, engine)  # decode only: the paged decode op
        assert [item.num_tokens for item in scheduled] == [1, 1]
        assert_on_device(audit, logits, tokens, 2, cfg.vocab_size)


def test_the_step_writes_and_reads_the_latent_cache_on_the_device(cfg):
    with fake_cuda() as fake:
        engine, _ = build_engine(cfg)
        engine.add_request([3, 4, 5, 6, 7, 8], GREEDY)
        scheduled = engine.scheduler.schedule()
        with fake.audit() as audit:
            ids, batch, sample_rows = engine.runner.prepare(scheduled)
            hidden = engine.runner.model(ids, batch, engine.runner.kv_caches)  # stores, then gathers, each layer
        assert audit.cpu_ops == [] and len(audit.uploads) == 1
        (group,) = batch.groups
        inputs = [ids, batch.positions, batch.slot_mapping, batch.out_rows, sample_rows, group.token_index,
                  group.ctx_slots, group.mask, group.block_tables, group.context_lens]
        assert {t.device for t in inputs} == {CUDA}
        assert tuple(group.ctx_slots.shape) == (1, 6) and tuple(group.mask.shape) == (1, 1, 6, 6)
        assert hidden.device == CUDA and tuple(hidden.shape) == (6, cfg.hidden_size)


def test_sampling_greedy_and_filtered_stays_on_the_device():
    params = [GREEDY, SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.0, top_k=7, top_p=0.5)]
    with fake_cuda() as fake:
        logits = torch.randn(len(params), 64, device="cuda")
        # A CPU-only build cannot make a CUDA generator: the unseeded draws use the device's default one.
        with fake.audit() as audit:
            tokens = sample_tokens(logits, params, [None] * len(params))
        assert audit.cpu_ops == []
        assert tokens.device == CUDA and tuple(tokens.shape) == (len(params),) and tokens.dtype == torch.int64


def test_logprobs_are_computed_and_packed_with_the_ids_on_the_device():
    # Rows asking (greedy and sampled, k = 0 and 20) among rows that do not: one float64 tensor on the device.
    params = [SamplingParams(temperature=0.0, logprobs=20), GREEDY, SamplingParams(temperature=0.7, logprobs=0),
              SamplingParams(temperature=0.9, top_p=0.8)]
    with fake_cuda() as fake:
        logits = torch.randn(len(params), 64, device="cuda")
        with fake.audit() as audit:
            tokens = sample_tokens(logits, params, [None] * len(params))
            packed = pack(tokens, logprob_block(logits, tokens, params))
        assert audit.cpu_ops == [] and audit.uploads == []  # the asking rows are gathered without an index upload
        assert packed.device == CUDA and packed.dtype == torch.float64
        assert tuple(packed.shape) == (len(params) + 2 * (1 + 2 * 20),)
        with pytest.raises(DataDependentOutputException):
            sample_step(logits, params, [None] * len(params))  # its one host read, of that one tensor


def test_load_counts_accumulate_on_the_device_and_are_read_only_by_snapshot():
    with fake_cuda() as fake:
        stats = LoadStats((1, 2), 4, device=CUDA)
        topk_idx = torch.randint(-1, 4, (5, 2), device="cuda")
        with fake.audit() as audit:
            stats.add(1, topk_idx)
            stats.add(2, topk_idx)
        assert audit.cpu_ops == [] and audit.uploads == []
        with pytest.raises(DataDependentOutputException):
            stats.snapshot()  # the host read is here, when the planner asks
