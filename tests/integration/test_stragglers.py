"""Stragglers get less, end to end through `moemesh up`: an expert node stopped in short bursts (SIGSTOP) while
clients stream is flagged in status from the attention node's hop p99s, and the leader's next plan halves its
share of every expert (all are replicated here), so it computes a smaller part of the routed tokens."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .test_elastic import MAX_TOKENS, PROMPTS, Mesh, _experts, model  # noqa: F401 (model: the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

STOP_S, RUN_S = 0.15, 0.3  # a burst: far past a hop (~1 ms), far below the dispatch deadline (30 s)


def _computed(status) -> dict[str, int]:
    return {i: int(n.get("tokens_computed", 0)) for i, n in _experts(status).items()}


def _fraction(before: dict, after: dict, node: str) -> float:
    delta = {i: after[i] - before[i] for i in after}
    return delta[node] / max(1, sum(delta.values()))


def test_a_node_slowed_in_bursts_is_flagged_and_given_less(model, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "8", "--rebalance-interval", "2")
    stop = threading.Event()
    victim = mesh.processes()["expert-1"].pid

    def traffic():
        while not stop.is_set():
            mesh.client.generate(prompt_ids=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    def bursts():
        while not stop.is_set():
            os.kill(victim, signal.SIGSTOP)
            time.sleep(STOP_S)
            os.kill(victim, signal.SIGCONT)
            time.sleep(RUN_S)

    feeder, slower = threading.Thread(target=traffic, daemon=True), threading.Thread(target=bursts, daemon=True)
    workers = [feeder]
    try:
        feeder.start()
        start = _computed(mesh.status())  # first, the planner's even shares without bursts
        even = mesh.wait_status(lambda s: sum(_computed(s).values()) >= sum(start.values()) + 2000, timeout_s=120,
                                what="2000 routed tokens before the bursts")
        share_before = _fraction(start, _computed(even), "expert-1")
        workers.append(slower)
        slower.start()
        flagged = mesh.wait_status(
            lambda s: _experts(s)["expert-1"].get("hop_straggler")
            and "stragglers given less: expert-1" in s["placement_reason"],
            timeout_s=150, what="expert-1 flagged and a placement that gives it less")
        nodes = _experts(flagged)
        assert not nodes["expert-0"].get("hop_straggler")
        assert nodes["expert-1"]["hop_p99_us"] >= 3 * nodes["expert-0"]["hop_p99_us"], nodes
        lowered_at = _computed(mesh.wait_status(lambda s: all(int(n["placement_version"]) == int(
            s["placement_version"]) for n in s["nodes"]), timeout_s=60, what="every node on the new placement"))
        later = mesh.wait_status(lambda s: sum(_computed(s).values()) >= sum(lowered_at.values()) + 2000,
                                 timeout_s=120, what="2000 routed tokens on the lowered placement")
        share_after = _fraction(lowered_at, _computed(later), "expert-1")
        print(f"expert-1 computed {share_before:.1%} of routed tokens before, {share_after:.1%} after; "
              f"hop p99 expert-0 {nodes['expert-0']['hop_p99_us']:.0f} us, expert-1 {nodes['expert-1']['hop_p99_us']:.0f} us")
        assert share_after < share_before - 0.05, (share_before, share_after)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        os.kill(victim, signal.SIGCONT)
        mesh.close()
