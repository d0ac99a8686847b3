"""The attention node's gRPC service on 127.0.0.1 over a real engine (tiny checkpoint)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from moemesh.attn_node.engine import EngineConfig
from moemesh.attn_node.engine_loop import EngineLoop
from moemesh.sampling import SamplingParams
from moemesh.attn_node.service import AttentionService, attention_server
from moemesh.launch.embedded import build_local
from moemesh.model.tiny import write_tiny_checkpoint
from moemesh.v1 import attention_pb2, attention_pb2_grpc, inference_pb2

pytestmark = pytest.mark.integration


class _Served:
    """An aio server on its own event-loop thread, so the test can use the sync client."""

    def __init__(self, service):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port, _ = asyncio.run_coroutine_threadsafe(self._start(service), self.loop).result()

    async def _start(self, service):
        server, port, health = attention_server(service)
        await server.start()
        return server, port, health

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def node(tiny_checkpoint):
    path = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2,
                                 experts=8, experts_per_token=2)
    mesh = build_local(path, "float32", EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), progress=False)
    reference = build_local(path, "float32", EngineConfig(), progress=False)
    loop = EngineLoop(mesh.engine, max_pending=4).start()
    served = _Served(AttentionService(loop, mesh.cfg, mesh.tokenizer))
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    yield attention_pb2_grpc.AttentionNodeStub(channel), reference, mesh, loop
    channel.close()
    served.stop()
    loop.stop()


def _request(ids=None, text=None, **sampling):
    sampling.setdefault("max_tokens", 8)
    req = inference_pb2.GenerateRequest(sampling=inference_pb2.SamplingParams(**sampling))
    if ids is not None:
        req.token_ids.ids.extend(ids)
    if text is not None:
        req.text = text
    return req


def _collect(stub, req):
    tokens, text, last = [], "", None
    for resp in stub.Generate(req, timeout=60):
        tokens.extend(resp.token_ids)
        text += resp.text
        last = resp
    return tokens, text, last


def test_streamed_tokens_equal_the_engine(node):
    stub, reference, _, _ = node
    prompts = [[0, 5, 9, 11], [0, 40, 41, 42, 43, 44, 45]]
    want = [o.token_ids for o in reference.engine.generate(
        prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    for prompt, expected in zip(prompts, want):
        tokens, text, last = _collect(stub, _request(ids=prompt, max_tokens=8, ignore_eos=True))
        assert tokens == expected
        assert text == reference.tokenizer.decode(expected)
        assert last.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 8)


def test_text_prompt_and_resume_continue_the_same_tokens(node):
    stub, _, _, _ = node
    full, _, _ = _collect(stub, _request(text="The river", max_tokens=10, ignore_eos=True))
    req = _request(text="The river", max_tokens=10, ignore_eos=True)
    req.resume_token_ids.extend(full[:4])
    rest, _, last = _collect(stub, req)
    assert full[:4] + rest == full and last.usage.completion_tokens == 10


def _stream(stub, req):
    """Every response, as the client receives them."""
    return list(stub.Generate(req, timeout=60))


@pytest.mark.parametrize("with_stop", [False, True])
def test_resume_at_every_token_continues_tokens_text_and_usage_exactly(node, with_stop):
    # What the router does after a node died: the same request plus the token ids the client already has.
    # The client's text so far plus the resumed stream's text must be the uninterrupted text, with a stop
    # string's held-back prefix neither lost nor sent twice.
    stub = node[0]
    prompt = dict(text="The river", max_tokens=14, ignore_eos=True)
    _, plain, _ = _collect(stub, _request(**prompt))
    stop = [plain[6:9]] if with_stop else []
    assert not with_stop or len(stop[0]) == 3, plain
    full = _stream(stub, _request(**prompt, stop=stop))
    tokens = [t for r in full for t in r.token_ids]
    assert full[-1].finish_reason == ("stop" if with_stop else "length")
    for cut in range(1, len(full)):
        req = _request(**prompt, stop=stop)
        req.resume_token_ids.extend(tokens[:cut])
        rest = _stream(stub, req)
        assert tokens[:cut] + [t for r in rest for t in r.token_ids] == tokens
        assert "".join(r.text for r in full[:cut] + rest) == "".join(r.text for r in full), cut
        assert rest[-1].finish_reason == full[-1].finish_reason
        assert rest[-1].usage.completion_tokens == len(tokens)
        assert rest[-1].usage.prompt_tokens == full[-1].usage.prompt_tokens


def test_resume_past_the_end_of_a_generation_is_invalid(node):
    stub, reference = node[0], node[1]
    tokens, _, _ = _collect(stub, _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True))
    sent = reference.tokenizer.decode(tokens[:8])
    assert len(sent) >= 4, sent
    cases = [(dict(stop_token_ids=[tokens[2]]), tokens[:3], "stop/EOS token"),
             (dict(stop=[sent[2:4]]), tokens[:8], "stop string"),
             (dict(), tokens[:3] + [10**6], "vocabulary"),
             (dict(max_tokens=3), tokens[:3], "fewer than sampling.max_tokens")]
    for sampling, resume, message in cases:
        req = _request(ids=[0, 5, 9], **{"max_tokens": 12, "ignore_eos": True, **sampling})
        req.resume_token_ids.extend(resume)
        with pytest.raises(grpc.RpcError) as exc:
            _collect(stub, req)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details()


def test_stop_string_ends_generation_and_is_not_emitted(node):
    stub, reference, _, _ = node
    tokens, text, _ = _collect(stub, _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True))
    stop = text[3:5]
    assert stop, text
    tokens2, text2, last = _collect(stub, _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True, stop=[stop]))
    assert last.finish_reason == "stop" and stop not in text2 and text.startswith(text2)


def test_logprobs_with_token_texts_a_stop_string_and_a_resume(node):
    stub, reference, _, _ = node
    tok = reference.tokenizer
    full = _stream(stub, _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=2))
    tokens = [t for r in full for t in r.token_ids]
    assert all([lp.token_id for lp in r.logprobs] == list(r.token_ids) for r in full)
    for lp in (lp for r in full for lp in r.logprobs):
        assert len(lp.top) == 2 and (lp.top[0].token_id, lp.top[0].logprob) == (lp.token_id, lp.logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob
        assert lp.token == tok.decode([lp.token_id], skip_special_tokens=False)
        assert [t.token for t in lp.top] == [tok.decode([t.token_id], skip_special_tokens=False) for t in lp.top]
    text = "".join(r.text for r in full)
    stop = text[4:6]
    stopped = _stream(stub, _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=2,
                                     stop=[stop]))
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(full)
    assert [len(r.logprobs) for r in stopped] == [1] * len(stopped)  # the ending response keeps its token's too
    assert stopped[-1].logprobs[0].token_id == stopped[-1].token_ids[0] == tokens[len(stopped) - 1]
    resume = _request(ids=[0, 5, 9], max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=2)
    resume.resume_token_ids.extend(tokens[:5])
    rest = _stream(stub, resume)
    assert [lp.token_id for r in rest for lp in r.logprobs] == tokens[5:]  # none for the carried tokens
    assert _stream(stub, _request(ids=[0, 5, 9], max_tokens=3))[0].logprobs == []  # not asked: none


@pytest.mark.parametrize("req, field", [
    (_request(ids=[1, 2], max_tokens=0), "max_tokens"),
    (_request(ids=[1, 2], temperature=-1.0), "temperature"),
    (_request(ids=[1, 2], top_p=0.0), "top_p"),
    (_request(ids=[1, 2], top_k=10**6), "top_k"),
    (_request(ids=[1, 99999]), "vocabulary"),
    (_request(), "prompt"),
    (_request(ids=[1], stop=["x"] * 40), "stop"),
    (_request(ids=[1], stop_token_ids=[10**6]), "stop_token_ids"),
    (_request(ids=[1], logprobs=21), "sampling.logprobs"),
    (_request(ids=list(range(2, 300)) * 8, max_tokens=4), "context"),
])
def test_invalid_fields_are_invalid_argument(node, req, field):
    stub = node[0]
    with pytest.raises(grpc.RpcError) as exc:
        _collect(stub, req)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc.value.details()
    assert _collect(stub, _request(ids=[0, 3], max_tokens=2))[0]  # still serving


def test_cancelled_stream_frees_the_request(node):
    stub, _, mesh, _ = node
    call = stub.Generate(_request(ids=[0, 5], max_tokens=500, ignore_eos=True), timeout=60)
    next(call)
    call.cancel()
    for _ in range(200):
        if not mesh.engine.has_unfinished():
            break
        threading.Event().wait(0.05)
    assert not mesh.engine.has_unfinished()
    load = stub.Load(attention_pb2.LoadRequest(), timeout=5)
    assert load.running == 0 and load.cache_free_tokens == load.cache_total_tokens


def test_full_inbox_is_resource_exhausted_and_never_unbounded(tmp_path):
    from moemesh.errors import ResourceExhaustedError

    path = write_tiny_checkpoint(tmp_path / "m", arch="deepseek_v2", hidden_size=64, layers=2, experts=4,
                                 experts_per_token=2)
    mesh = build_local(path, "float32", EngineConfig(max_num_seqs=1, max_num_batched_tokens=8), progress=False)
    loop = EngineLoop(mesh.engine, max_pending=1).start()
    done = threading.Event()
    try:
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        loop.submit("a", [0, 5], long, lambda ev: None)
        for _ in range(400):  # until the engine thread has taken "a" into the running batch
            if loop.num_running():
                break
            done.wait(0.01)
        loop.submit("b", [0, 6], long, lambda ev: done.set() if ev.finished else None)
        with pytest.raises(ResourceExhaustedError, match="waiting"):
            loop.submit("c", [0, 7], long, lambda ev: None)
    finally:
        loop.abort("a")
        loop.abort("b")
        loop.stop()


def test_prometheus_metrics_count_requests_tokens_and_latency(node):
    from prometheus_client import REGISTRY

    stub = node[0]
    before = REGISTRY.get_sample_value("moemesh_generated_tokens_total", {"role": "attn"}) or 0.0
    _collect(stub, _request(ids=[0, 5, 9], max_tokens=5, ignore_eos=True))
    assert REGISTRY.get_sample_value("moemesh_generated_tokens_total", {"role": "attn"}) == before + 5
    assert REGISTRY.get_sample_value("moemesh_requests_total", {"role": "attn", "outcome": "length"}) >= 1
    assert REGISTRY.get_sample_value("moemesh_time_to_first_token_seconds_count", {"role": "attn"}) >= 1
    assert REGISTRY.get_sample_value("moemesh_kv_cache_usage_ratio", {"role": "attn"}) is not None


def test_tokenize_and_model_info(node):
    stub, reference, mesh, _ = node
    got = stub.Tokenize(inference_pb2.TokenizeRequest(text="The river ran"), timeout=5)
    assert list(got.token_ids) == mesh.tokenizer.encode("The river ran")
    bare = stub.Tokenize(inference_pb2.TokenizeRequest(text="The river ran", add_special_tokens=False), timeout=5)
    assert list(bare.token_ids) == mesh.tokenizer.encode("The river ran", add_special_tokens=False)
    assert len(bare.token_ids) == len(got.token_ids) - 1  # the tiny tokenizer's post-processor adds one BOS
    info = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)
    assert (info.model_type, info.vocab_size, info.has_tokenizer) == ("deepseek_v3", mesh.cfg.vocab_size, True)


def test_load_and_metrics_report_the_prefix_cache(node):
    from prometheus_client import REGISTRY

    from moemesh.prefix_hash import block_hashes

    stub, _, mesh, loop = node
    loop.publish_metrics()  # another test in this module started a loop of its own since
    prompt = [(7 * i + 3) % mesh.cfg.vocab_size for i in range(40)]  # 2 full blocks of 16 and 8 more
    before = stub.Load(attention_pb2.LoadRequest(), timeout=5)
    first, _, _ = _collect(stub, _request(ids=prompt, max_tokens=4, ignore_eos=True, temperature=0.0))
    second, _, _ = _collect(stub, _request(ids=prompt, max_tokens=4, ignore_eos=True, temperature=0.0))
    assert first == second
    load = stub.Load(attention_pb2.LoadRequest(), timeout=5)
    assert load.block_size == 16
    assert load.prompt_tokens - before.prompt_tokens == 80
    assert load.prefix_hit_tokens - before.prefix_hit_tokens == 32  # the second request's two full blocks
    assert set(block_hashes(prompt, 16)) <= set(load.prefix_hashes)
    assert load.cached_blocks >= 2 and load.evicted_blocks == before.evicted_blocks
    assert REGISTRY.get_sample_value("moemesh_prefix_hit_tokens_total", {"role": "attn"}) == load.prefix_hit_tokens
    assert REGISTRY.get_sample_value("moemesh_prompt_tokens_total", {"role": "attn"}) == load.prompt_tokens
    assert REGISTRY.get_sample_value("moemesh_prefix_cached_blocks", {"role": "attn"}) == load.cached_blocks
    assert REGISTRY.get_sample_value("moemesh_prefix_evicted_blocks_total", {"role": "attn"}) == load.evicted_blocks


def test_load_and_metrics_report_the_micro_batches(node):
    from prometheus_client import REGISTRY

    stub, _, mesh, loop = node
    loop.publish_metrics()
    _collect(stub, _request(ids=[5, 6, 7], max_tokens=3, ignore_eos=True, temperature=0.0))
    load = stub.Load(attention_pb2.LoadRequest(), timeout=5)
    # auto, the default, over local experts: whole steps (and a value, never 0, which means a node too old to say)
    assert load.micro_batches == 1 == loop.engine.micro.current
    assert REGISTRY.get_sample_value("moemesh_micro_batches", {"role": "attn"}) == 1
