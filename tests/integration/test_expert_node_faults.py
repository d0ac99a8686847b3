"""Expert nodes as real processes, under abuse and failure.

* malformed Dispatch messages (garbled bytes, wrong shapes, dtypes, ids, NaNs) end only their
  own stream with INVALID_ARGUMENT; a healthy stream on the same node keeps being served;
* grpc.health.v1 and reflection are served;
* a node SIGKILLed or SIGSTOPped mid-generation: its rows go to a replica and tokens do not change;
  with no replica left the step's requests fail fast (finish_reason "error") with a message naming the experts;
* SIGTERM drains: in-flight work is answered, health turns NOT_SERVING, the process exits 0;
* ``moemesh generate --expert-nodes`` prints what the single process prints.
"""

from __future__ import annotations

import json
import queue
import random
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from moemesh.attn_node.engine import EngineConfig
from moemesh.sampling import SamplingParams
from moemesh.wire.codec import from_proto, to_proto
from moemesh.model.config import ModelConfig
from moemesh.expert_backend import ExpertBackendError
from moemesh.expert_node.loader import load_expert_shard
from moemesh.launch.embedded import build_local, build_remote
from moemesh.control.placement import parse_expert_spec
from moemesh.v1 import dispatch_pb2, dispatch_pb2_grpc, tensor_pb2
from tests.helpers import eventually, thread_cpu_seconds
from tests.oracle.hf_models import build_hf_model, save_hf_model

from .mesh_procs import NodeSet, expert_nodes_flag, node_list

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

CONFIG = "v3_noaux_groups_bias"  # MoE layers 1 and 2, 8 experts, K = 2, hidden 64
DISPATCH = "/moemesh.v1.ExpertDispatch/Dispatch"
SERVICE = "moemesh.v1.ExpertDispatch"
ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
PROMPT_LENGTHS = (5, 13, 30)
NEW_TOKENS = 24
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
BIG = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
# The node the malformed-message tests hit: layer 2 experts 6 and 7 are not hosted there.
ABUSED_SPEC = "1:0-7,2:0-5"


# ---- module fixtures --------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp(CONFIG)
    save_hf_model(CONFIG, path)
    return path


@pytest.fixture(scope="module")
def cfg(model_dir):
    return ModelConfig.from_dir(model_dir)


@pytest.fixture(scope="module")
def prompts(cfg):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference_tokens(model_dir, prompts):
    """Fault-free single-process tokens."""
    local = build_local(model_dir, "float32", ENGINE, progress=False)
    return [o.token_ids for o in local.engine.generate(prompts, PARAMS)]


@pytest.fixture(scope="module")
def shared_nodes(model_dir):
    """Long-lived nodes for the non-destructive tests: one to abuse, and a 0-3 / 4-7 pair for the CLI."""
    with NodeSet() as nodes:
        abused, low, high = nodes.start(model_dir, [ABUSED_SPEC, "0-3", "4-7"])
        yield dict(abused=abused, pair=[low, high])


@pytest.fixture
def nodes():
    with NodeSet() as ns:
        yield ns


# ---- helpers ----------------------------------------------------------------
def run_engine(engine, prompts, on_step=None) -> list[list[int]]:
    """Step an engine to completion by hand; ``on_step(step_number)`` runs after each step."""
    rids = [engine.add_request(p, PARAMS) for p in prompts]
    tokens = {rid: [] for rid in rids}
    n = 0
    while engine.has_unfinished():
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token_id)
        n += 1
        if on_step is not None:
            on_step(n)
    return [tokens[rid] for rid in rids]


class GoodStream:
    """A well-formed Dispatch stream driven one message at a time."""

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        stub = dispatch_pb2_grpc.ExpertDispatchStub(channel)
        self.call = stub.Dispatch(iter(self._outbox.get, None), timeout=90)
        self._ids = 0

    def ask(self, layer, x, idx, w) -> torch.Tensor:
        self._ids += 1
        self._outbox.put(request(layer, x, idx, w, msg_id=self._ids))
        resp = next(self.call)
        assert resp.id == self._ids
        return from_proto(resp.output).clone()

    def close(self) -> None:
        self._outbox.put(None)
        assert list(self.call) == []


def request(layer, x, idx, w, msg_id=0) -> dispatch_pb2.DispatchRequest:
    return dispatch_pb2.DispatchRequest(id=msg_id, layer=layer, hidden=to_proto(x), topk_idx=to_proto(idx),
                                        topk_weights=to_proto(w))


def sample_rows(layer_ids: list[int], rows: int, k: int, seed: int, hidden: int = 64):
    """Random rows routed to ``k`` distinct experts drawn from ``layer_ids`` (some assignments -1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    ids = torch.tensor(layer_ids)
    idx = torch.stack([ids[torch.randperm(len(ids), generator=gen)[:k]] for _ in range(rows)])
    idx[0, -1] = -1  # "computed elsewhere"
    w = torch.rand(rows, k, generator=gen)
    return x, idx, w


def raw_tensor(dtype, shape, data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def send_raw(channel: grpc.Channel, payloads: list[bytes], timeout: float = 20.0):
    """Send undecoded messages on a fresh stream: (responses, RpcError or None)."""
    call = channel.stream_stream(DISPATCH, request_serializer=None,
                                 response_deserializer=dispatch_pb2.DispatchResponse.FromString)
    responses = []
    try:
        for resp in call(iter(payloads), timeout=timeout):
            responses.append(resp)
    except grpc.RpcError as exc:
        return responses, exc
    return responses, None


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# ---- malformed messages -----------------------------------------------------
def _malformed_cases(cfg: ModelConfig) -> list[tuple[str, bytes, str]]:
    """(what, serialized request, a fragment the error must contain)."""
    D = cfg.hidden_size
    F32, I64 = tensor_pb2.FLOAT32, tensor_pb2.INT64
    x = torch.randn(3, D)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    w = torch.rand(3, 2)

    def req(layer=1, hidden=None, topk_idx=None, topk_weights=None, omit=()) -> bytes:
        r = dispatch_pb2.DispatchRequest(id=5, layer=layer)
        for name, value, default in (("hidden", hidden, x), ("topk_idx", topk_idx, idx),
                                     ("topk_weights", topk_weights, w)):
            if name not in omit:
                value = default if value is None else value
                getattr(r, name).CopyFrom(value if isinstance(value, tensor_pb2.Tensor) else to_proto(value))
        return r.SerializeToString()

    nan_w = w.clone()
    nan_w[1, 0] = float("nan")
    inf_w = w.clone()
    inf_w[2, 1] = float("inf")
    return [
        ("wrong hidden size", req(hidden=torch.randn(3, D // 2)), "hidden_size"),
        ("wider hidden", req(hidden=torch.randn(3, D + 1)), "hidden_size"),
        ("hidden int64", req(hidden=torch.ones(3, D, dtype=torch.int64)), "dtype"),
        ("idx float32", req(topk_idx=idx.float()), "dtype"),
        ("weights float16", req(topk_weights=w.half()), "dtype"),
        ("weights float64 enum missing", req(topk_weights=raw_tensor(99, (3, 2), bytes(48))), "unknown dtype"),
        ("hidden unset", req(omit=("hidden",)), "DTYPE_UNSPECIFIED"),
        ("hidden 1-D", req(hidden=torch.randn(D)), "dims"),
        ("hidden 3-D", req(hidden=torch.randn(3, 1, D)), "dims"),
        ("short payload", req(hidden=raw_tensor(F32, (3, D), bytes(3 * D * 4 - 1))), "bytes"),
        ("long payload", req(topk_idx=raw_tensor(I64, (3, 2), bytes(3 * 2 * 8 + 8))), "bytes"),
        ("negative dim", req(hidden=raw_tensor(F32, (-3, D), b"")), "negative"),
        ("huge dims", req(hidden=raw_tensor(F32, (1 << 40, 1 << 40), bytes(16))), "bytes"),
        ("K mismatch", req(topk_weights=torch.rand(3, 3)), "topk_weights"),
        ("K above num_experts_per_tok", req(topk_idx=torch.zeros(3, 50, dtype=torch.int64),
                                            topk_weights=torch.rand(3, 50)), "at most"),
        ("row mismatch", req(topk_idx=torch.tensor([[0, 1], [2, 3]]), topk_weights=torch.rand(2, 2)), "rows"),
        ("unknown layer", req(layer=99), "layer 99"),
        ("dense layer", req(layer=0), "layer 0"),
        ("expert not hosted", req(layer=2, topk_idx=torch.tensor([[0, 1], [6, 2], [3, 7]])), "not hosted"),
        ("id out of range", req(topk_idx=torch.tensor([[0, 1], [2, cfg.n_routed_experts], [4, 5]])), "expert ids"),
        ("id below -1", req(topk_idx=torch.tensor([[0, -2], [2, 3], [4, 5]], dtype=torch.int32)), "expert ids"),
        ("NaN weights", req(topk_weights=nan_w), "NaN"),
        ("inf weights", req(topk_weights=inf_w), "infinity"),
        ("undecodable", b"\xff\xff\xff\xff", ""),
        ("truncated varint", bytes([0x08, 0x80]), ""),
        ("wrong wire type", bytes([0x1A, 0x05]) + b"abc", ""),
    ]


def _garbles(cfg: ModelConfig, n: int = 50, seed: int = 1234) -> list[bytes]:
    """Random bytes, and valid messages with flipped, dropped or inserted bytes."""
    rng = random.Random(seed)
    valid = [request(1, *sample_rows(list(range(8)), rows, 2, seed=rows), msg_id=rows).SerializeToString()
             for rows in (1, 4, 9)]
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(rng.randbytes(rng.randint(1, 300)))
        else:
            buf = bytearray(rng.choice(valid))
            if kind in (1, 2):  # flip 1..4 bytes, biased to the header and tensor framing
                for _ in range(rng.randint(1, 4)):
                    pos = rng.randrange(min(len(buf), 64)) if kind == 1 else rng.randrange(len(buf))
                    buf[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            elif kind == 3:  # truncate
                del buf[rng.randrange(1, len(buf)):]
            else:  # insert junk
                pos = rng.randrange(len(buf))
                buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
            out.append(bytes(buf))
    return out


def test_malformed_messages_fail_only_their_own_stream(shared_nodes, model_dir, cfg):
    node = shared_nodes["abused"]
    hosted = parse_expert_spec(ABUSED_SPEC, cfg.moe_layers, cfg.n_routed_experts)
    shard = load_expert_shard(str(model_dir), cfg, hosted, progress=False)
    good_channel = grpc.insecure_channel(node.address)
    bad_channel = grpc.insecure_channel(node.address)
    try:
        good = GoodStream(good_channel)  # opened before any abuse

        def check_good(seed):
            for layer in cfg.moe_layers:
                x, idx, w = sample_rows(hosted[layer], 7, 2, seed=seed + layer)
                torch.testing.assert_close(good.ask(layer, x, idx, w), shard.forward(layer, x, idx, w),
                                           rtol=1e-5, atol=1e-5)

        check_good(0)
        for what, payload, fragment in _malformed_cases(cfg):
            responses, err = send_raw(bad_channel, [payload])
            assert err is not None, f"{what}: the node accepted it ({len(responses)} responses)"
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {err.code()} {err.details()}"
            assert err.details(), what
            assert fragment.lower() in err.details().lower(), f"{what}: {err.details()!r}"
        check_good(100)

        # A stream that was fine until its second message: the first is answered, then INVALID_ARGUMENT.
        x, idx, w = sample_rows(hosted[1], 4, 2, seed=3)
        ok = request(1, x, idx, w, msg_id=41).SerializeToString()
        responses, err = send_raw(bad_channel, [ok, b"\xff\xff"])
        assert [r.id for r in responses] == [41]
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Fuzz: every garbled message is either rejected with INVALID_ARGUMENT or (a flip that kept
        # it valid) answered with a well-formed reply; never another status, never a dead node.
        rejected = 0
        for i, payload in enumerate(_garbles(cfg)):
            responses, err = send_raw(bad_channel, [payload])
            if err is not None:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"garble {i}: {err.code()} {err.details()}"
                rejected += 1
            else:
                assert len(responses) == 1 and len(responses[0].output.shape) == 2, f"garble {i}"
                assert responses[0].output.shape[1] == cfg.hidden_size
        assert rejected >= 25, f"only {rejected} of 50 garbles were rejected: the fuzzing is too gentle"

        check_good(200)
        good.close()
        assert node.alive(), node.stderr_tail()
        assert health_status(bad_channel, "") == health_pb2.HealthCheckResponse.SERVING
        warnings = [e for e in node.log_events() if e.get("event") == "bad_dispatch"]
        assert len(warnings) >= len(_malformed_cases(cfg)), "each rejected message is logged"
    finally:
        good_channel.close()
        bad_channel.close()


# ---- health and reflection --------------------------------------------------
def test_health_reflection_and_info(shared_nodes, cfg):
    node = shared_nodes["abused"]
    with grpc.insecure_channel(node.address) as channel:
        for service in ("", SERVICE):
            assert health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as exc:
            health_status(channel, "no.such.Service")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services, services
        dispatch = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE)
        assert {m.name for m in dispatch.methods} == {"Dispatch", "Info"}
        method = dispatch.methods_by_name["Dispatch"]
        assert method.client_streaming and method.server_streaming

        info = dispatch_pb2_grpc.ExpertDispatchStub(channel).Info(dispatch_pb2.InfoRequest(), timeout=10)
        assert info.hidden_size == cfg.hidden_size and info.n_routed_experts == cfg.n_routed_experts
        assert {le.layer: list(le.experts) for le in info.experts} == \
            parse_expert_spec(ABUSED_SPEC, cfg.moe_layers, cfg.n_routed_experts)


# ---- failures mid-generation ------------------------------------------------
def test_sigkill_mid_generation_with_replicas(nodes, model_dir, prompts, reference_tokens):
    # Every expert has two replicas: 0,1 on a+c; 2-5 on a+b; 6,7 on b+c.
    a, b, c = nodes.start(model_dir, ["0-5", "2-7", "0-1,6-7"])
    mesh = build_remote(model_dir, node_list([a, b, c]), "float32", ENGINE, progress=False, dispatch_timeout_s=20)
    try:
        killed = {}

        def on_step(n):
            if n == 4:  # prefill done for some, decoding for others
                b.kill()
                b.wait(timeout=10)
                killed["at"] = time.monotonic()
            elif n == 5:  # the step that met the dead node: timed from the kill, not over the whole run
                killed["failover_s"] = time.monotonic() - killed["at"]

        tokens = run_engine(mesh.engine, prompts, on_step)
        assert killed["failover_s"] < 20, "failover should not wait for the dispatch deadline"
        assert tokens == reference_tokens
        assert mesh.remote.links[1].failure is not None
        assert [link.failure for link in (mesh.remote.links[0], mesh.remote.links[2])] == [None, None]
    finally:
        mesh.close()


def test_sigkill_without_replica_fails_the_step_naming_the_experts(nodes, model_dir, cfg, prompts):
    low, high = nodes.start(model_dir, ["0-3", "4-7"])
    timeout_s = 5.0
    mesh = build_remote(model_dir, node_list([low, high]), "float32", ENGINE, progress=False,
                        dispatch_timeout_s=timeout_s)
    try:
        for p in prompts:
            mesh.engine.add_request(p, PARAMS)
        for _ in range(2):
            mesh.engine.step()
        high.kill()
        high.wait(timeout=10)
        t0 = time.monotonic()
        failed = []
        for _ in range(NEW_TOKENS + 10):  # the very next step should fail; a few more at most
            failed = [ev for ev in mesh.engine.step() if ev.finish_reason == "error"]
            if failed:
                break
        elapsed = time.monotonic() - t0
        assert elapsed < timeout_s + 5, f"took {elapsed:.1f}s"
        assert len(failed) == len(prompts) and not mesh.engine.has_unfinished()
        assert all(ev.token_id is None and ev.finished for ev in failed)
        message = str(failed[0].error)
        assert "no live expert node hosts" in message
        named = re.findall(r"layer (\d+): experts ([\d,\-]+)", message)
        assert named, message
        for layer, ids in named:
            assert int(layer) in cfg.moe_layers, message
            experts = set()
            for part in ids.split(","):
                lo, _, hi = part.partition("-")
                experts.update(range(int(lo), int(hi or lo) + 1))
            assert experts and experts <= set(range(4, 8)), message
    finally:
        mesh.close()


def test_stopped_node_times_out_and_replica_takes_its_rows(nodes, model_dir, prompts, reference_tokens):
    a, b = nodes.start(model_dir, ["all", "all"])
    timeout_s = 2.0
    mesh = build_remote(model_dir, node_list([a, b]), "float32", ENGINE, progress=False, dispatch_timeout_s=timeout_s)
    step_times = []
    try:
        def on_step(n):
            step_times.append(time.monotonic())
            if n == 3:
                b.stop()

        tokens = run_engine(mesh.engine, prompts, on_step)
        total = time.monotonic() - step_times[2]  # from the SIGSTOP (after step 3) to the end, not the whole run
        assert tokens == reference_tokens
        failure = mesh.remote.links[1].failure
        assert failure is not None and mesh.remote.links[0].failure is None
        durations = [t1 - t0 for t0, t1 in zip(step_times, step_times[1:])]
        assert max(durations) >= timeout_s * 0.9, "the step after SIGSTOP waited for the deadline"
        # One deadline, not one per layer or per step: the silent node is dropped after the first.
        assert total < 3 * timeout_s + 15, f"{total:.1f}s"
        assert b.alive()
    finally:
        mesh.close()  # before SIGCONT + SIGKILL in the nodes fixture


# ---- SIGTERM ----------------------------------------------------------------
def test_sigterm_finishes_in_flight_work_and_exits_zero(nodes, model_dir, cfg):
    # its limit sized for the one big message below (480_000 rows: a step that large, not the default 512)
    (node,) = nodes.start(model_dir, ["all"], ["--max-batched-tokens", "480000"])
    shard = load_expert_shard(str(model_dir), cfg, None, progress=False)
    channel = grpc.insecure_channel(node.address, options=BIG)
    statuses: list = []

    def watch():
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for resp in stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60):
                statuses.append(resp.status)
        except grpc.RpcError as exc:
            statuses.append(exc.code())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stream = GoodStream(channel)
        x, idx, w = sample_rows(list(range(8)), 3, 2, seed=5)  # 6 assignments: computed inline, no worker thread
        torch.testing.assert_close(stream.ask(1, x, idx, w), shard.forward(1, x, idx, w), rtol=1e-5, atol=1e-5)
        eventually(lambda: statuses, what="the health Watch's first status")  # watching before the SIGTERM
        threads_before = set(thread_cpu_seconds(node.pid))

        # ~1.5 CPU s of expert math on the node (every row to K experts), then SIGTERM while it runs.
        rows = 480_000
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(rows, cfg.hidden_size, generator=gen)
        k = cfg.num_experts_per_tok
        idx = (torch.arange(rows, dtype=torch.int32).unsqueeze(1) * k + torch.arange(k, dtype=torch.int32)) % 8
        w = torch.rand(rows, k, generator=gen)
        msg = request(2, x, idx, w, msg_id=stream._ids + 1)
        stream._ids += 1
        stream._outbox.put(msg)
        # Decoding this message costs the node's event loop ~0.3 CPU s, about as much as a guess at "mid-math"
        # by total CPU would wait for; so wait for the math itself: the shard's worker thread (started by the
        # first message too big to compute inline) busy on it.
        def math_running():
            return [tid for tid, cpu in thread_cpu_seconds(node.pid).items() if tid not in threads_before and cpu >= 0.05]

        eventually(math_running, what="the node's expert worker thread computing the big message")
        node.terminate()
        resp = next(stream.call)
        assert resp.id == stream._ids
        torch.testing.assert_close(from_proto(resp.output), shard.forward(2, x, idx, w), rtol=1e-4, atol=1e-4)
        with pytest.raises(StopIteration):  # the stream ends cleanly after its in-flight message
            next(stream.call)
        stream._outbox.put(None)
        assert node.wait(timeout=60) == 0, node.stderr_tail()
        watcher.join(timeout=60)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[:1] == [serving], statuses
        assert not_serving in statuses, f"health never turned NOT_SERVING before exit: {statuses}"
        log = node.log_events()
        events = [e.get("event") for e in log]
        assert events.index("draining") < events.index("stopped"), events
        draining = log[events.index("draining")]
        assert draining.get("in_flight") == 1, f"SIGTERM did not land while the message was in flight: {draining}"
    finally:
        channel.close()


# ---- the CLI, end to end ----------------------------------------------------
def test_cli_generate_over_expert_nodes_matches_single_process(shared_nodes, model_dir):
    base = [sys.executable, "-m", "moemesh.cli", "generate", "--model", str(model_dir), "--prompt-ids", "5,6,7",
            "--prompt-ids", "9,10", "--max-tokens", "8", "--temperature", "0", "--json"]
    flag = expert_nodes_flag(shared_nodes["pair"])
    assert flag.count("=") == 2
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in (base, base + ["--expert-nodes", flag])]
    outs = []
    for proc in runs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        outs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    single, mesh = outs
    assert len(single) == 2 and [o["prompt_ids"] for o in single] == [[5, 6, 7], [9, 10]]
    assert all(o["token_ids"] for o in single)
    assert mesh == single


def test_attention_side_refuses_an_expert_node_serving_other_weights(shared_nodes, tmp_path):
    """Same config and shapes, other weights: the checkpoint fingerprints differ and the connect fails, named."""
    other = tmp_path / "other"
    build_hf_model(CONFIG, seed=1).save_pretrained(other)
    with pytest.raises(ExpertBackendError, match="serves checkpoint .* this attention node"):
        build_remote(other, node_list(shared_nodes["pair"]), "float32", ENGINE, progress=False)


def test_spec_claiming_experts_a_node_lacks_is_refused(shared_nodes, model_dir):
    """--expert-nodes must not assign a node experts it does not host: caught at connect, named."""
    node = shared_nodes["pair"][0]  # hosts 0-3 only
    with pytest.raises(ExpertBackendError, match="does not host"):
        build_remote(model_dir, [(node.address, "all")], "float32", ENGINE, progress=False)


def test_cli_unreachable_expert_node_is_one_line(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "generate", "--model", str(model_dir), "--prompt-ids", "1,2",
         "--expert-nodes", "127.0.0.1:1=all"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
