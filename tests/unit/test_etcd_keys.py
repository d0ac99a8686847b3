"""The pure part of moemesh.control.etcd: key names, record and placement checks, endpoint parsing."""

from __future__ import annotations

import pytest

from moemesh.control.etcd import Keys, check_node_record, check_placement, parse_endpoint


def test_keys_exact():
    k = Keys("prod")
    assert k.root == "/moemesh/prod/"
    assert k.nodes() == "/moemesh/prod/nodes/"
    assert k.nodes("attn") == "/moemesh/prod/nodes/attn/"
    assert k.nodes("expert") == "/moemesh/prod/nodes/expert/"
    assert k.node("expert", "expert-0") == "/moemesh/prod/nodes/expert/expert-0"
    assert k.node("attn", "a.1_x") == "/moemesh/prod/nodes/attn/a.1_x"
    assert k.leader() == "/moemesh/prod/leader"
    assert k.placement() == "/moemesh/prod/placement"
    assert Keys().root == "/moemesh/default/"


def test_keys_refuse_bad_names():
    for cluster in ("", "a/b", "-x", "a b"):
        with pytest.raises(ValueError, match="cluster name"):
            Keys(cluster)
    k = Keys()
    with pytest.raises(ValueError, match="role"):
        k.node("router", "r0")
    for node_id in ("", "a/b", "../x"):
        with pytest.raises(ValueError, match="node id"):
            k.node("attn", node_id)


def test_parse_node_and_check():
    k = Keys("c1")
    assert k.parse_node("/moemesh/c1/nodes/expert/e-3") == ("expert", "e-3")
    assert k.parse_node("/moemesh/c1/nodes/attn/a0") == ("attn", "a0")
    assert k.parse_node("/moemesh/c2/nodes/attn/a0") is None
    assert k.parse_node("/moemesh/c1/nodes/router/r0") is None
    assert k.parse_node("/moemesh/c1/nodes/attn/a0/x") is None
    assert k.parse_node("/moemesh/c1/leader") is None
    assert k.check("/moemesh/c1/placement") == "/moemesh/c1/placement"
    with pytest.raises(ValueError, match="not under '/moemesh/c1/'"):
        k.check("/moemesh/c2/placement")
    with pytest.raises(ValueError):
        k.check("placement")


def test_node_record_checks():
    ok = {"id": "e0", "role": "expert", "address": "127.0.0.1:5000", "status": "ready",
          "capacity": {"slots": 8}, "experts": {"1": [0, 1], "2": [3]}}
    assert check_node_record(ok) is ok
    for field in ("id", "role", "address", "status"):
        with pytest.raises(ValueError, match=field):
            check_node_record({k: v for k, v in ok.items() if k != field})
    with pytest.raises(ValueError, match="status"):
        check_node_record({**ok, "status": "up"})
    with pytest.raises(ValueError, match="role"):
        check_node_record({**ok, "role": "router"})
    with pytest.raises(ValueError, match="experts"):
        check_node_record({**ok, "experts": {"1": 3}})
    with pytest.raises(TypeError):
        check_node_record({**ok, "capacity": {"slots": object()}})


def test_placement_checks():
    ok = {"version": 3, "layers": {"1": {"0": ["e0", "e1"], "1": ["e1"]}}}
    assert check_placement(ok) is ok
    assert check_placement({"version": 0, "layers": {}})
    for bad in ({"layers": {}}, {"version": -1, "layers": {}}, {"version": True, "layers": {}},
                {"version": 1}, {"version": 1, "layers": {"1": ["e0"]}},
                {"version": 1, "layers": {"1": {"0": "e0"}}}, {"version": 1, "layers": {"1": {"0": [0]}}}):
        with pytest.raises(ValueError):
            check_placement(bad)


def test_parse_endpoint():
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_endpoint("http://etcd.svc:2379/") == ("etcd.svc", 2379)
    for bad in ("127.0.0.1", ":2379", "host:port", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_endpoint(bad)
