"""Message limits computed for a config, shorten(), and where the metrics server listens."""

from __future__ import annotations

import importlib
import urllib.request

import pytest

from moemesh import metrics
from moemesh.errors import InvalidRequestError
from moemesh.text import shorten
from moemesh.wire import limits
from moemesh.wire.limits import dispatch_message_bytes, dispatch_rows_within
from moemesh.wire.requests import check_request_id
from moemesh.wire.server import server_options
from moemesh.wire.status import details_of

cli_main = importlib.import_module("moemesh.cli.main")  # the module (moemesh.cli exports its main function)


def test_the_expert_limit_of_a_config_is_its_largest_step_plus_ids_weights_and_margin():
    # DeepSeek-V3: hidden 7168, 8 experts per token, the default step of 512 tokens, float32 on the wire:
    # 512 x (7168 x 4 + 8 x (8 + 4)) + 1 MiB
    assert dispatch_message_bytes(512, 7168, 8) == 512 * (7168 * 4 + 96) + (1 << 20) == 15_777_792
    assert dispatch_message_bytes(512, 7168, 8, hidden_itemsize=2) == 8_437_760  # bfloat16 rows
    assert dispatch_message_bytes(4, 64, 2) == 1_049_696  # the tiny test model, steps of 4 tokens


def test_the_expert_node_limit_uses_its_max_batched_tokens_and_the_widest_hidden_dtype():
    from moemesh.expert_node.server import message_limit
    from moemesh.model.config import ModelConfig
    from moemesh.model.tiny import tiny_config_dict

    cfg = ModelConfig.from_dict(tiny_config_dict(arch="deepseek_v3", hidden_size=64, experts=8, experts_per_token=2))
    assert message_limit(cfg) == dispatch_message_bytes(512, 64, 2) == 512 * (64 * 4 + 24) + (1 << 20)
    assert message_limit(cfg, 4) == 1_049_696


def test_rows_within_a_limit_round_trips_the_step():
    limit = dispatch_message_bytes(512, 7168, 8)
    assert dispatch_rows_within(limit, 7168, 8, 4) == 512
    assert dispatch_rows_within(limit, 7168, 8, 2) == 1020  # bfloat16 rows: about twice as many fit
    assert dispatch_rows_within(1, 7168, 8, 4) == 1  # never zero: one row always goes


def test_a_step_too_large_for_grpc_is_refused_with_the_flag_to_change():
    with pytest.raises(ValueError, match="lower --max-batched-tokens"):
        dispatch_message_bytes(1 << 17, 7168, 8)


def test_every_server_role_has_an_explicit_limit_and_expert_nodes_must_give_theirs():
    assert dict(server_options("router"))["grpc.max_receive_message_length"] == limits.ROUTER_MAX_MESSAGE_BYTES
    assert dict(server_options("attn"))["grpc.max_receive_message_length"] == limits.ATTN_MAX_MESSAGE_BYTES
    assert dict(server_options("control"))["grpc.max_send_message_length"] == limits.CONTROL_MAX_MESSAGE_BYTES
    assert dict(server_options("expert", 12345))["grpc.max_receive_message_length"] == 12345
    with pytest.raises(ValueError, match="max_message_bytes"):
        server_options("expert")


def test_client_options_match_the_servers_they_call():
    attn = dict(limits.client_options("attn"))
    assert attn["grpc.max_send_message_length"] == limits.ATTN_MAX_MESSAGE_BYTES
    assert attn["grpc.max_receive_message_length"] == limits.ROUTER_MAX_MESSAGE_BYTES
    assert dict(limits.client_options("etcd"))["grpc.keepalive_time_ms"] >= 5_000  # etcd refuses faster pings


def test_shorten_cuts_long_text_and_says_how_much():
    assert shorten("node-1") == "node-1"
    assert shorten("a" * 10_000, 8) == "aaaaaaaa...(+9992 chars)"
    assert len(shorten("x" * 10_000)) < 100


def test_a_10kb_request_id_is_cut_in_its_error():
    with pytest.raises(InvalidRequestError) as exc:
        check_request_id("r" * 10_000)
    assert "(+9936 chars)" in str(exc.value) and len(str(exc.value)) < 300


def test_status_details_are_cut_whatever_they_quote():
    assert len(details_of(InvalidRequestError("y" * 100_000))) < 2100


def test_metrics_listen_on_the_given_host_only():
    server = metrics.serve_metrics(0, "127.0.0.1")
    try:
        host, port = server.socket.getsockname()[:2]
        assert host == "127.0.0.1"  # the listening socket: loopback, not 0.0.0.0
        assert b"moemesh_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", ["router", "attn-node", "expert-node"])
def test_metrics_port_binds_the_commands_host(monkeypatch, command):
    bound = []
    monkeypatch.setattr(metrics, "serve_metrics", lambda port, host: bound.append((port, host)))
    monkeypatch.setattr(cli_main.COMMANDS[command], "run", lambda args: 0)
    argv = {"router": ["router", "--etcd", "127.0.0.1:2379"], "attn-node": ["attn-node", "--model", "m"],
            "expert-node": ["expert-node", "--model", "m"]}[command]
    assert cli_main.main([*argv, "--metrics-port", "9090"]) == 0
    assert cli_main.main([*argv, "--metrics-port", "9091", "--host", "10.1.2.3"]) == 0
    assert bound == [(9090, "127.0.0.1"), (9091, "10.1.2.3")]
