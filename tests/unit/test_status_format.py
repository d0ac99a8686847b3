"""`moemesh status` text: placement, balancedness, per-node planned and computed load."""

from moemesh.cli.status import format_status


def test_format_status_shows_the_plan_and_every_node():
    status = {
        "placement_version": 4, "leader": "router-a", "placement_reason": "periodic rebalance: replicas moved",
        "moved": 3, "window_tokens": 1200,
        "balance": [{"layer": 1, "balancedness": 0.99}, {"layer": 2, "balancedness": 0.95}],
        "nodes": [
            {"id": "attn-0", "role": "attn", "address": "h:1", "status": "ready", "placement_version": 4,
             "running": 2, "waiting": 1, "cache_free": 0.5, "prompt_tokens": 800, "prefix_hit_tokens": 600,
             "cached_blocks": 40, "evicted_blocks": 3},
            {"id": "expert-0", "role": "expert", "address": "h:2", "status": "ready", "placement_version": 4,
             "experts": [{"layer": 1, "experts": [0, 1]}, {"layer": 2, "experts": [0]}], "planned_load": 0.6,
             "tokens_computed": 300},
            {"id": "expert-1", "role": "expert", "address": "h:3", "status": "draining", "placement_version": 3,
             "experts": [], "planned_load": 0.4, "tokens_computed": 100},
        ],
    }
    lines = format_status(status).splitlines()
    assert lines[0] == "placement version 4; leader router-a"
    assert "periodic rebalance: replicas moved; moved 3 replicas; load window 1200 routed tokens" in lines[1]
    assert lines[2].endswith("worst 0.950; by layer 1:0.990 2:0.950")
    # expert-1 is draining: expert-0 alone serves, so its loss would lose what it hosts
    assert lines[3] == "  one expert-node loss: NOT survivable (losing expert-0 would lose layer 1: experts 0-1; " \
                       "layer 2: experts 0)"
    assert lines[4].endswith("running 2, waiting 1, cache free 50%, prefix hits 600/800 prompt tokens (75.0%), "
                             "40 cached blocks, 3 evicted")
    assert "3 experts, planned load 60.0%, computed 300 routed tokens (75.0%)" in lines[5]
    assert "draining" in lines[6] and "v3" in lines[6]


def test_format_status_one_loss_survivable_when_every_expert_is_on_two_ready_nodes():
    both = [{"layer": 1, "experts": [0, 1]}]
    nodes = [{"id": f"expert-{i}", "role": "expert", "address": f"h:{i}", "status": "ready", "experts": both}
             for i in range(2)]
    assert "  one expert-node loss: survivable" in format_status({"nodes": nodes}).splitlines()
    nodes[1]["experts"] = [{"layer": 1, "experts": [0]}]
    assert ("  one expert-node loss: NOT survivable (losing expert-0 would lose layer 1: experts 1)"
            in format_status({"nodes": nodes}).splitlines())


def test_format_status_before_any_traffic():
    text = format_status({"placement_version": 1, "leader": "", "placement_reason": "there is no placement yet",
                          "window_tokens": 0, "nodes": []})
    assert "leader -" in text and "(no traffic yet: even spread)" in text


def test_format_status_says_when_the_mesh_is_degraded_or_unservable():
    base = {"placement_version": 2, "leader": "r", "nodes": []}
    assert len(format_status({**base, "mesh_state": "serving", "mesh_problem": ""}).splitlines()) == 1
    text = format_status({**base, "mesh_state": "unservable", "mesh_problem": "the mesh cannot serve: no live expert "
                          "node hosts layers 1-2: experts 4-7"})
    assert text.splitlines()[1] == ("  mesh UNSERVABLE: the mesh cannot serve: no live expert node hosts layers 1-2: "
                                    "experts 4-7")
    assert format_status({**base, "mesh_state": "degraded", "mesh_problem": "p"}).splitlines()[1] == "  mesh DEGRADED: p"


def test_format_status_shows_hops_per_expert_node_and_flags_a_straggler():
    node = {"id": "expert-0", "role": "expert", "address": "h:2", "status": "ready", "experts": [],
            "hop_samples": "120", "hop_p50_us": 410.4, "hop_p99_us": 2900.0, "compute_p50_us": 95.2}
    (line,) = [l for l in format_status({"nodes": [node]}).splitlines() if "expert-0" in l]
    assert line.endswith("hop p50 410 us p99 2900 us (compute p50 95 us)")
    (line,) = [l for l in format_status({"nodes": [{**node, "hop_straggler": True}]}).splitlines() if "expert-0" in l]
    assert line.endswith("(compute p50 95 us) STRAGGLER: hop p99 well above its peers'")
    quiet = {k: v for k, v in node.items() if not k.startswith(("hop", "compute"))}
    assert "hop" not in format_status({"nodes": [quiet]})


def test_format_status_shows_applied_load_when_stragglers_got_less_and_micro_batches():
    nodes = [{"id": "expert-0", "role": "expert", "address": "h:2", "status": "ready", "experts": [],
              "planned_load": 0.5, "applied_load": 0.331},
             {"id": "expert-1", "role": "expert", "address": "h:3", "status": "ready", "experts": [],
              "planned_load": 0.5, "applied_load": 0.5},
             {"id": "attn-0", "role": "attn", "address": "h:1", "status": "ready", "micro_batches": 2}]
    lines = format_status({"nodes": nodes}).splitlines()
    assert "planned load 50.0% (applied 33.1%: stragglers given less)" in lines[-3]
    assert "planned load 50.0%, computed" in lines[-2]
    assert lines[-1].endswith(", micro-batches 2")
