"""The router's control plane on loopback: leader election between router replicas, and the leader placing
experts (real etcd; expert node records written here through a Registry, standing in for the nodes).
"""

from __future__ import annotations

import time

import grpc
import pytest

from moemesh.control.etcd import Registry
from moemesh.v1 import inference_pb2, inference_pb2_grpc

from tests.helpers import DEADLINE_S, eventually, node_record

from .test_router import TTL, bg, start_router  # noqa: F401 (bg: a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.slow
def test_two_routers_one_leader_and_takeover(bg, etcd):
    watcher = bg.run(Registry.connect(etcd.endpoint, "election"))
    leader_key = watcher.keys.leader()
    a = start_router(bg, etcd, "election", router_id="router-a")
    b = None
    try:
        eventually(lambda: a.is_leader, DEADLINE_S, "the first router leads")
        b = start_router(bg, etcd, "election", router_id="router-b")
        time.sleep(TTL)  # the thing under test: a few campaign rounds (every TTL/3) and b does not take over
        assert (a.is_leader, b.is_leader) == (True, False)
        assert bg.run(watcher.leader(leader_key)) == "router-a"
        bg.run(a.registry.close())  # the leader's etcd session dies: its lease and key go
        eventually(lambda: b.is_leader, DEADLINE_S, "the second router takes over")
        assert bg.run(watcher.leader(leader_key)) == "router-b"
    finally:
        for r in (a, b):
            if r is not None:
                bg.run(r.stop(grace_s=1))
        bg.run(watcher.close())


def test_leader_places_every_expert_and_republishes_without_a_gone_node(bg, etcd):
    cluster = "placing"
    capacity = {"slots": 8, "moe_layers": [1, 2], "n_routed_experts": 8}
    experts = []
    for i in range(2):
        reg = bg.run(Registry.connect(etcd.endpoint, cluster, ttl_s=TTL))
        bg.run(reg.register(node_record("expert", f"expert-{i}", {"address": f"127.0.0.1:{7000 + i}",
                                                                  "status": "loading", "capacity": capacity})))
        experts.append(reg)
    r = start_router(bg, etcd, cluster, router_id="router-p")
    channel = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        key = experts[0].keys.placement()
        placement = eventually(lambda: bg.run(experts[0].get(key)), DEADLINE_S, "the leader writes a placement")
        assert placement["version"] == 1 and sorted(placement["layers"]) == ["1", "2"]
        for layer in ("1", "2"):
            assert sorted(placement["layers"][layer], key=int) == [str(e) for e in range(8)]
            assert all(sorted(ids) == ["expert-0", "expert-1"] for ids in placement["layers"][layer].values())
        bg.run(experts[0].update(status="ready", experts={1: (0, 1), 2: (0, 1)}))
        eventually(lambda: r.view.placement_version == 1, DEADLINE_S, "the router's view has the placement")

        def status_ready():
            s = stub.ClusterStatus(inference_pb2.ClusterStatusRequest(), timeout=5)
            return s if s.nodes and s.nodes[0].status == "ready" else None
        status = eventually(status_ready, DEADLINE_S, "ClusterStatus shows expert-0 ready")
        assert [(n.id, n.role) for n in status.nodes] == [("expert-0", "expert"), ("expert-1", "expert")]
        assert [(e.layer, list(e.experts)) for e in status.nodes[0].experts] == [(1, [0, 1]), (2, [0, 1])]
        assert (status.placement_version, status.leader) == (1, "router-p")

        bg.run(experts[1].close())  # expert-1 dies: the leader republishes without it
        placement = eventually(lambda: (p := bg.run(experts[0].get(key)))["version"] == 2 and p, DEADLINE_S,
                               "placement version 2")
        assert all(ids == ["expert-0"] for layer in placement["layers"].values() for ids in layer.values())
        assert r.control.placements_written == 2
    finally:
        channel.close()
        bg.run(r.stop(grace_s=1))
        for reg in experts:
            bg.run(reg.close())


def test_leader_spreads_every_expert_over_the_zones_its_nodes_name(bg, etcd):
    cluster = "zoned"
    capacity = {"slots": 4, "moe_layers": [1], "n_routed_experts": 8}  # 4 x 4 = 2 x 8: two replicas each
    zones = {"expert-0": "a", "expert-1": "a", "expert-2": "b", "expert-3": "b"}
    experts = []
    for i, (node, zone) in enumerate(zones.items()):
        reg = bg.run(Registry.connect(etcd.endpoint, cluster, ttl_s=TTL))
        bg.run(reg.register(node_record("expert", node, {"address": f"127.0.0.1:{7100 + i}", "status": "loading",
                                                         "capacity": capacity, "zone": zone})))
        experts.append(reg)
    r = start_router(bg, etcd, cluster, router_id="router-z")
    try:
        key = experts[0].keys.placement()
        placement = eventually(lambda: bg.run(experts[0].get(key)), DEADLINE_S, "the leader writes a placement")
        holders = placement["layers"]["1"]
        assert sorted(holders, key=int) == [str(e) for e in range(8)]
        assert all(sorted(zones[n] for n in nodes) == ["a", "b"] for nodes in holders.values()), holders
    finally:
        bg.run(r.stop(grace_s=1))
        for reg in experts:
            bg.run(reg.close())
