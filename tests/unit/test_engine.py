"""Engine over a tiny transformers-written DeepSeek checkpoint (fp32, every expert in-process).

Continuous batching, chunked prefill, late arrivals and a full cache must not change
what any request generates; absorbed and naive MLA must agree; bad requests are
refused with InvalidRequestError before anything is queued.
"""

from __future__ import annotations

import dataclasses
import glob
import threading
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
import torch
from safetensors.torch import load_file

from moemesh.attn_node.attach import attach_experts
from moemesh.attn_node.engine import Engine, EngineConfig
from moemesh.attn_node.model import Transformer, hf_to_local_name
from moemesh.attn_node.experts.switchable_backend import SwitchableBackend
from moemesh.expert_backend import ExpertBackendError, StaticExpertBackend
from moemesh.sampling import SamplingParams
from moemesh.wire.status import status_for
from moemesh.model.config import ModelConfig
from moemesh.errors import InvalidRequestError
from moemesh.expert_node.local_backend import LocalExpertBackend
from moemesh.expert_node.shard import ExpertShard

VOCAB, CONTEXT = 300, 96


class Tiny(NamedTuple):
    model: Transformer  # attached to backend
    cfg: ModelConfig
    backend: LocalExpertBackend


def build_tiny_model(model_dir: Path, arch: str = "v2") -> Tiny:
    """Write a tiny random DeepSeek checkpoint with transformers and load it into moemesh's model."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        initializer_range=0.2, max_position_embeddings=CONTEXT,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0 if arch == "v2" else 1)
        if arch == "v2":
            hf_cfg = DeepseekV2Config(
                q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2, **common
            )
            hf = DeepseekV2ForCausalLM(hf_cfg)
        else:
            rope = dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
            )  # fmt: skip
            hf_cfg = DeepseekV3Config(
                q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                rope_parameters=rope, **common,
            )  # fmt: skip
            hf = DeepseekV3ForCausalLM(hf_cfg)
            for layer in hf.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    sd: dict[str, torch.Tensor] = {}
    for f in glob.glob(str(model_dir / "*.safetensors")):
        sd.update(load_file(f))
    shard = ExpertShard(cfg.n_routed_experts)
    for layer in cfg.moe_layers:
        p = f"model.layers.{layer}.mlp.experts"
        shard.add_experts(
            layer,
            {
                e: (sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"], sd[f"{p}.{e}.down_proj.weight"])
                for e in range(cfg.n_routed_experts)
            },
        )
    model = Transformer(cfg)
    state = {hf_to_local_name(k): v for k, v in sd.items() if hf_to_local_name(k)}
    if cfg.tie_word_embeddings:
        state.pop("head.weight", None)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    backend = LocalExpertBackend(shard)
    return Tiny(attach_experts(model, backend), cfg, backend)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-v2"), "v2")


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory) -> Tiny:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-v3"), "v3")


def engine(tiny: Tiny, **config) -> Engine:
    if "max_num_batched_tokens" in config:  # the engine requires budget >= max_num_seqs
        config.setdefault("max_num_seqs", config["max_num_batched_tokens"])
    return Engine(tiny.model, tiny.cfg, EngineConfig(**config), backend=tiny.backend)


def test_budget_smaller_than_seq_limit_is_refused(tiny):
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(tiny.model, tiny.cfg, EngineConfig(max_num_batched_tokens=4, max_num_seqs=8), backend=tiny.backend)


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


LENGTHS = (3, 9, 17, 5, 1)
MAX_TOKENS = (12, 5, 8, 10, 6)


@pytest.fixture(scope="session")
def alone(tiny) -> list[list[int]]:
    """Each of the reference requests run on its own engine."""
    out = []
    for p, n in zip(prompts_of(LENGTHS), MAX_TOKENS):
        (res,) = engine(tiny).generate([p], greedy(n))
        assert res.finish_reason == "length" and len(res.token_ids) == n
        out.append(res.token_ids)
    return out


def run_batched(eng: Engine) -> list[list[int]]:
    outs = eng.generate(prompts_of(LENGTHS), [greedy(n) for n in MAX_TOKENS])
    assert [o.finish_reason for o in outs] == ["length"] * len(LENGTHS)
    assert [o.prompt_ids for o in outs] == prompts_of(LENGTHS)
    assert not eng.has_unfinished()
    assert eng.blocks.num_free == eng.blocks.num_blocks  # every block came back
    return [o.token_ids for o in outs]


# ---- MLA: absorbed == naive ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_absorbed_mla_equals_naive(arch, request):
    model_cfg = request.getfixturevalue("tiny" if arch == "v2" else "tiny_v3")
    naive, absorbed, auto = (engine(model_cfg, mla_impl=m) for m in ("naive", "absorbed", "auto"))
    (prompt,) = prompts_of([13], seed=3)
    ref = naive.prompt_logits(prompt)
    assert ref.shape == (13, VOCAB) and ref.dtype == torch.float32
    torch.testing.assert_close(absorbed.prompt_logits(prompt), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto.prompt_logits(prompt), ref, atol=1e-5, rtol=1e-5)
    prompts = prompts_of((4, 11), seed=4)
    outs = [[o.token_ids for o in e.generate(prompts, greedy(10))] for e in (naive, absorbed, auto)]
    assert outs[0] == outs[1] == outs[2]


def test_unknown_mla_impl_is_refused(tiny):
    with pytest.raises(ValueError, match="mla_impl"):
        engine(tiny, mla_impl="flash")


def test_prompt_logits_predict_the_first_greedy_token(tiny):
    eng = engine(tiny)
    (prompt,) = prompts_of([7], seed=5)
    logits = eng.prompt_logits(prompt)
    (out,) = eng.generate([prompt], greedy(1))
    assert out.token_ids == [int(logits[-1].argmax())]
    # Scoring a longer prompt: its prefix rows are the shorter prompt's logits (causality).
    longer = eng.prompt_logits(prompt + [1, 2, 3])
    torch.testing.assert_close(longer[:7], logits, atol=1e-5, rtol=1e-5)


# ---- continuous batching == alone ----------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"max_num_batched_tokens": 8, "block_size": 4},  # chunked prefill interleaved with decode
        {"max_num_batched_tokens": 5, "block_size": 3, "max_num_seqs": 2},
        {"max_num_batched_tokens": 8, "block_size": 4, "mla_impl": "naive"},
    ],
    ids=["default", "chunked", "chunked-2seqs", "chunked-naive"],
)
@pytest.mark.slow
def test_continuous_batching_equals_alone(tiny, alone, config):
    assert run_batched(engine(tiny, **config)) == alone


def test_garbage_in_unwritten_cache_slots_never_leaks(tiny, alone):
    """Padded context positions must not read uninitialised cache memory (0 * NaN poisons attention)."""
    eng = engine(tiny, max_num_batched_tokens=8, block_size=4)
    for cache in eng.runner.kv_caches:
        cache[: eng.runner.null_slot].fill_(float("nan"))
    assert run_batched(eng) == alone


def test_chunked_prefill_really_interleaves(tiny):
    """Guard for the test above: with a budget of 8 some step mixes decodes and a mid-prompt chunk."""
    eng = engine(tiny, max_num_batched_tokens=8, block_size=4)
    steps = []
    schedule = eng.scheduler.schedule

    def recording():
        items = schedule()
        steps.append([(it.num_tokens, it.seq.num_cached >= len(it.seq.prompt_ids), it.samples) for it in items])
        return items

    eng.scheduler.schedule = recording
    eng.generate(prompts_of(LENGTHS), [greedy(n) for n in MAX_TOKENS])
    assert all(sum(n for n, _, _ in st) <= 8 for st in steps)
    assert any(any(dec for _, dec, _ in st) and any(not smp for _, _, smp in st) for st in steps)


def test_requests_arriving_while_others_run(tiny, alone):
    eng = engine(tiny, max_num_batched_tokens=8, block_size=4)
    prompts = prompts_of(LENGTHS)
    got: dict[str, list[int]] = {}
    ids = []
    arrive_at = {0: [0], 2: [1, 2], 3: [3], 7: [4]}  # step number -> requests added before it
    step = 0
    while step in arrive_at or eng.has_unfinished() or step <= max(arrive_at):
        for i in arrive_at.get(step, []):
            ids.append(eng.add_request(prompts[i], greedy(MAX_TOKENS[i]), request_id=f"r{i}"))
        for ev in eng.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
        assert step < 500
    assert ids == [f"r{i}" for i in range(len(LENGTHS))]
    assert [got[f"r{i}"] for i in range(len(LENGTHS))] == alone


def test_cache_full_requests_wait_then_complete(tiny, alone):
    # Six blocks of 4 tokens; no two of these requests fit together.
    eng = engine(tiny, kv_cache_tokens=24, block_size=4, max_num_batched_tokens=8)
    prompts = prompts_of(LENGTHS)
    idx = [1, 2, 0]  # needs 13, 24, 14 tokens -> 4, 6, 4 blocks of the 6
    for i in idx:
        eng.add_request(prompts[i], greedy(MAX_TOKENS[i]), request_id=f"r{i}")
    got: dict[str, list[int]] = {}
    waited = False
    for _ in range(500):
        if not eng.has_unfinished():
            break
        events = eng.step()
        assert len(eng.scheduler.running) <= 1
        waited |= bool(eng.scheduler.waiting)
        for ev in events:
            got.setdefault(ev.request_id, []).append(ev.token_id)
    assert not eng.has_unfinished()
    assert waited
    assert [got[f"r{i}"] for i in idx] == [alone[i] for i in idx]
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_generate_with_a_cache_for_one_request_at_a_time(tiny, alone):
    assert run_batched(engine(tiny, kv_cache_tokens=24, block_size=4)) == alone


# ---- refused requests ------------------------------------------------------


def test_longer_than_context_is_refused(tiny):
    eng = engine(tiny)
    (prompt,) = prompts_of([CONTEXT - 4])
    with pytest.raises(InvalidRequestError, match="context of 96"):
        eng.add_request(prompt, greedy(5))
    eng.add_request(prompt, greedy(4))  # exactly the context is fine
    (too_long,) = prompts_of([CONTEXT + 1])
    with pytest.raises(InvalidRequestError, match="context"):
        eng.add_request(too_long, greedy(1))


def test_longer_than_the_whole_cache_is_refused(tiny):
    eng = engine(tiny, kv_cache_tokens=16, block_size=4)
    (prompt,) = prompts_of([10])
    with pytest.raises(InvalidRequestError, match="whole cache holds 16") as exc:
        eng.add_request(prompt, greedy(8))  # needs 17 tokens of cache
    assert "17 tokens" in str(exc.value)
    eng.add_request(prompt, greedy(7))  # 16 tokens: fits
    assert eng.has_unfinished()


def test_generate_refuses_before_queueing_anything(tiny):
    eng = engine(tiny)
    good, bad = prompts_of([4]) + [[VOCAB]]
    with pytest.raises(InvalidRequestError):
        eng.generate([good, bad], greedy(3))
    assert not eng.has_unfinished()


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], greedy(4), "empty"),
        ([1, VOCAB], greedy(4), "vocabulary"),
        ([1, -1], greedy(4), "vocabulary"),
        ([1, 2.0], greedy(4), "vocabulary"),
    ],
    ids=["empty", "id-too-big", "id-negative", "id-float"],
)  # fmt: skip
def test_bad_inputs_are_refused(tiny, prompt, params, match):
    eng = engine(tiny)
    with pytest.raises(InvalidRequestError, match=match):
        eng.add_request(prompt, params)
    assert not eng.has_unfinished()


# Sampling fields are checked where a request enters the process (tests/unit/test_sampling.py); the engine
# takes a checked SamplingParams as is.


def test_duplicate_request_id_is_refused(tiny):
    eng = engine(tiny)
    eng.add_request([1, 2], greedy(2), request_id="x")
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request([3, 4], greedy(2), request_id="x")


# ---- finishing -------------------------------------------------------------


def test_max_tokens_finishes_with_length(tiny, alone):
    eng = engine(tiny)
    (prompt,) = prompts_of([LENGTHS[0]])
    rid = eng.add_request(prompt, greedy(4))
    events = []
    while eng.has_unfinished():
        events.extend(eng.step())
    assert [e.request_id for e in events] == [rid] * 4
    assert [e.token_id for e in events] == alone[0][:4]
    assert [e.finished for e in events] == [False, False, False, True]
    assert [e.finish_reason for e in events] == [None, None, None, "length"]


def test_stop_token_stops_with_stop(tiny, alone):
    full = alone[0]
    stop = full[4]
    k = full.index(stop)
    (prompt,) = prompts_of([LENGTHS[0]])
    (out,) = engine(tiny).generate([prompt], greedy(len(full), stop_token_ids=(stop, VOCAB - 1)))
    assert out.token_ids == full[: k + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignore_eos(tiny, alone):
    model, cfg, backend = tiny
    full = alone[0]
    eos = full[3]
    k = full.index(eos)
    eos_cfg = dataclasses.replace(cfg, eos_token_ids=(eos,))
    (prompt,) = prompts_of([LENGTHS[0]])
    params = SamplingParams(max_tokens=len(full), temperature=0.0)
    (out,) = Engine(model, eos_cfg, backend=backend).generate([prompt], params)
    assert out.token_ids == full[: k + 1]
    assert out.finish_reason == "stop"
    (out,) = Engine(model, eos_cfg, backend=backend).generate([prompt], dataclasses.replace(params, ignore_eos=True))
    assert out.token_ids == full
    assert out.finish_reason == "length"


def test_abort_frees_the_cache(tiny):
    eng = engine(tiny, block_size=4)
    a = eng.add_request(prompts_of([6])[0], greedy(10))
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_blocks
    eng.abort(a)
    assert not eng.has_unfinished()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    eng.abort(a)  # twice is harmless
    eng.abort("never-seen")


# ---- sampling ----------------------------------------------------------------


def sampled(max_tokens=16, seed=7, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_seeded_sampling_is_reproducible_across_engines(tiny):
    (prompt,) = prompts_of([5], seed=9)
    (a,) = engine(tiny).generate([prompt], sampled())
    (b,) = engine(tiny, block_size=4, max_num_batched_tokens=3).generate([prompt], sampled())
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 16
    (c,) = engine(tiny).generate([prompt], sampled(seed=8))
    assert c.token_ids != a.token_ids


def test_seeded_request_is_unaffected_by_batch_neighbours(tiny):
    prompts = prompts_of([5, 8, 3], seed=9)
    (alone_out,) = engine(tiny).generate([prompts[0]], sampled())
    outs = engine(tiny).generate(prompts, [sampled(), sampled(seed=1), greedy(12)])
    assert outs[0].token_ids == alone_out.token_ids


def test_unseeded_request_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    engine(tiny).add_request([1, 2, 3], SamplingParams(temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batched_ping_pong_gives_the_same_tokens(tiny, alone, micro_batches):
    assert run_batched(engine(tiny, max_num_batched_tokens=8, block_size=4, micro_batches=micro_batches)) == alone


class _FailingBackend(StaticExpertBackend):
    """Unit-test stand-in: the local experts until call N, then the routed experts are unavailable."""

    def __init__(self, inner, fail_after: int, on_fail=lambda: None):
        self.inner, self.calls, self.fail_after, self.on_fail = inner, 0, fail_after, on_fail

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        self.calls += 1
        if self.calls > self.fail_after:
            self.on_fail()
            raise ExpertBackendError(f"no live expert node hosts layer {layer_id}: experts 0-3")
        return self.inner.dispatch(layer_id, x, topk_idx, topk_weights)

    def combine(self, handle):
        return self.inner.combine(handle)


def test_unavailable_experts_fail_the_steps_requests_and_the_engine_goes_on(tiny):
    model, cfg, inner = tiny
    failing = _FailingBackend(inner, fail_after=len(model.moe_layers()) * 3)  # three good steps, then failure
    attach_experts(model, failing)
    try:
        eng = Engine(model, cfg, EngineConfig(), backend=failing)
        rids = [eng.add_request(p, greedy(10)) for p in prompts_of([4, 6])]
        events = []
        started = time.monotonic()
        while eng.has_unfinished():
            events.extend(eng.step())
        assert time.monotonic() - started < EngineConfig.expert_wait_s  # a static backend never waits
        errors = [ev for ev in events if ev.finish_reason == "error"]
        assert sorted(ev.request_id for ev in errors) == sorted(rids)
        assert all(ev.token_id is None and isinstance(ev.error, ExpertBackendError) and "layer" in str(ev.error)
                   for ev in errors)
        failing.fail_after = 10**9  # the experts come back: new requests run normally
        out = eng.generate(prompts_of([5]), greedy(3))
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 3
    finally:
        attach_experts(model, inner)


def test_a_step_whose_experts_fail_waits_for_the_next_backend_and_reruns(tiny, alone):
    """Experts lost mid-step (after one MoE layer dispatched): the step waits, re-runs on the backend
    installed meanwhile, and every request generates exactly what it does alone."""
    model, cfg, inner = tiny
    switch = SwitchableBackend()
    installs = []

    def install_the_good_one():  # from another thread, as the placement follower does
        if not installs:
            installs.append(threading.Thread(target=switch.install, args=(inner,)))
            installs[0].start()

    failing = _FailingBackend(inner, fail_after=len(model.moe_layers()) * 2 + 1, on_fail=install_the_good_one)
    switch.install(failing)
    attach_experts(model, switch)
    try:
        eng = Engine(model, cfg, EngineConfig(max_num_batched_tokens=8, max_num_seqs=8, block_size=4),
                     backend=switch)
        assert run_batched(eng) == alone
        assert failing.calls == failing.fail_after + 1  # it failed once, and only the new backend ran after
        assert switch.current is inner and switch.generation == 2
    finally:
        attach_experts(model, inner)


def test_a_step_waits_at_most_expert_wait_s_then_fails_its_requests(tiny):
    model, cfg, inner = tiny
    switch = SwitchableBackend()
    switch.install(_FailingBackend(inner, fail_after=0))
    attach_experts(model, switch)
    try:
        eng = Engine(model, cfg, EngineConfig(expert_wait_s=0.2), backend=switch)
        rids = [eng.add_request(p, greedy(4)) for p in prompts_of([4, 6])]
        started = time.monotonic()
        events = eng.step()
        assert time.monotonic() - started >= 0.2
        assert [(ev.request_id, ev.token_id, ev.finished, ev.finish_reason, type(ev.error)) for ev in events] == [
            (rid, None, True, "error", ExpertBackendError) for rid in rids]
        assert {status_for(ev.error) for ev in events} == {grpc.StatusCode.UNAVAILABLE}
        assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks
    finally:
        attach_experts(model, inner)


def test_a_step_fails_at_once_when_no_placement_can_host_its_experts(tiny):
    """The outlook says unservable: the step's requests fail now with its message, not after expert_wait_s."""
    from moemesh.attn_node.experts.replica_routes import ExpertsUnservable
    from moemesh.control.servability import judge

    model, cfg, inner = tiny
    switch = SwitchableBackend(outlook=lambda current: judge({1: [0, 1, 2, 3]}, 1, 4, 8))
    switch.install(_FailingBackend(inner, fail_after=0))
    attach_experts(model, switch)
    try:
        eng = Engine(model, cfg, EngineConfig(expert_wait_s=3600.0), backend=switch)  # a wait would hang the test
        rids = [eng.add_request(p, greedy(4)) for p in prompts_of([4, 6])]
        events = eng.step()
        assert [(ev.request_id, ev.finish_reason, type(ev.error)) for ev in events] == [
            (rid, "error", ExpertsUnservable) for rid in rids]
        assert str(events[0].error) == judge({1: [0, 1, 2, 3]}, 1, 4, 8).message
        assert {status_for(ev.error) for ev in events} == {grpc.StatusCode.UNAVAILABLE}
        assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks
    finally:
        attach_experts(model, inner)


def test_the_engine_runs_only_on_the_backend_its_model_is_attached_to(tiny):
    other = LocalExpertBackend(tiny.backend.shard)
    with pytest.raises(ValueError, match="attach_experts"):
        Engine(tiny.model, tiny.cfg, backend=other)


@pytest.mark.slow
@pytest.mark.parametrize("params", [greedy(12), sampled(12, top_k=20), sampled(12, seed=3, top_p=0.8)])
def test_resumed_request_continues_the_same_tokens(tiny, params):
    # A router resuming after a node died: prompt + the tokens the client has, the rest of max_tokens,
    # resumed= that many; greedy and seeded sampling go on exactly as the uninterrupted request.
    (prompt,) = prompts_of([6], seed=4)
    (full,) = engine(tiny).generate([prompt], params)
    for cut in (1, 5, 11):
        eng = engine(tiny)
        eng.add_request(prompt + full.token_ids[:cut], dataclasses.replace(params, max_tokens=12 - cut),
                        resumed=cut)
        rest = []
        while eng.has_unfinished():
            rest += [ev.token_id for ev in eng.step()]
        assert full.token_ids[:cut] + rest == full.token_ids


def test_resumed_must_leave_a_prompt(tiny):
    with pytest.raises(InvalidRequestError, match="resumed"):
        engine(tiny).add_request([1, 2], greedy(2), resumed=2)
