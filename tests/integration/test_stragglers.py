"""Stragglers get less, end to end through `moemesh up`: an expert node stopped in short bursts (SIGSTOP) while
clients stream is flagged in status from the attention node's hop p99s, and the leader's next plan halves its
share of every expert (all are replicated here), so it computes a smaller part of the routed tokens; status shows
the planned and the applied load apart. Once the bursts end, its hops fall out of the attention node's window,
the flag clears, and the next plan gives it its full share back."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from moemesh.attn_node.experts.hop_stats import percentile

from .test_elastic import MAX_TOKENS, PROMPTS, Mesh, _experts, model  # noqa: F401 (model: the fixture)

# recovery waits out the attention node's hop window (60 s) and a plan, after the flagging and the lowering
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

STOP_S, RUN_S = 0.15, 0.3  # a burst: far past a hop (~1 ms), far below the dispatch deadline (30 s)
TOKENS = 2000  # routed tokens per measured phase


def _computed(status) -> dict[str, int]:
    return {i: int(n.get("tokens_computed", 0)) for i, n in _experts(status).items()}


def _fraction(before: dict, after: dict, node: str) -> float:
    delta = {i: after[i] - before[i] for i in after}
    return delta[node] / max(1, sum(delta.values()))


class _Latencies:
    """(finished at, seconds) of every request the feeder ran, on the monotonic clock."""

    def __init__(self):
        self._done: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def add(self, started: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._done.append((now, now - started))

    def p99_ms(self, start: float, end: float) -> tuple[float, int]:
        with self._lock:
            window = [s * 1e3 for t, s in self._done if start <= t < end]
        return percentile(window, 99), len(window)


def test_a_node_slowed_in_bursts_is_flagged_given_less_and_recovers(model, tmp_path):
    mesh = Mesh(model, tmp_path, "--expert-nodes", "2", "--expert-slots", "8", "--rebalance-interval", "2")
    stop, calm = threading.Event(), threading.Event()
    victim = mesh.processes()["expert-1"].pid
    latencies = _Latencies()

    def traffic():
        while not stop.is_set():
            started = time.monotonic()
            mesh.client.generate(prompt_ids=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            latencies.add(started)

    def bursts():
        while not stop.is_set() and not calm.is_set():
            os.kill(victim, signal.SIGSTOP)
            time.sleep(STOP_S)
            os.kill(victim, signal.SIGCONT)
            time.sleep(RUN_S)

    def after_tokens(since: dict, what: str) -> dict:
        return mesh.wait_status(lambda s: sum(_computed(s).values()) >= sum(since.values()) + TOKENS,
                                timeout_s=120, what=f"{TOKENS} routed tokens {what}")

    def all_on_current(s) -> bool:
        return all(int(n["placement_version"]) == int(s["placement_version"]) for n in s["nodes"])

    feeder, slower = threading.Thread(target=traffic, daemon=True), threading.Thread(target=bursts, daemon=True)
    workers = [feeder]
    try:
        feeder.start()
        start = _computed(mesh.status())  # first, the planner's even shares without bursts
        share_before = _fraction(start, _computed(after_tokens(start, "before the bursts")), "expert-1")
        workers.append(slower)
        slower.start()
        bursts_from = time.monotonic()
        flagged = mesh.wait_status(
            lambda s: _experts(s)["expert-1"].get("hop_straggler")
            and "stragglers given less: expert-1" in s["placement_reason"],
            timeout_s=150, what="expert-1 flagged and a placement that gives it less")
        nodes = _experts(flagged)
        assert not nodes["expert-0"].get("hop_straggler")
        assert nodes["expert-1"]["hop_p99_us"] >= 3 * nodes["expert-0"]["hop_p99_us"], nodes
        # planned vs applied: the planner's even split, and what the lowered shares give
        assert nodes["expert-1"]["applied_load"] < nodes["expert-1"]["planned_load"] - 0.05, nodes["expert-1"]
        lowered = mesh.wait_status(all_on_current, timeout_s=60, what="every node on the new placement")
        lowered_from = time.monotonic()
        lowered_at = _computed(lowered)
        share_after = _fraction(lowered_at, _computed(after_tokens(lowered_at, "on the lowered placement")),
                                "expert-1")
        lowered_to = time.monotonic()

        calm.set()  # the bursts end: the flag clears once its slow hops leave the window, and the share comes back
        slower.join(10)
        os.kill(victim, signal.SIGCONT)
        recovered = mesh.wait_status(
            lambda s: not _experts(s)["expert-1"].get("hop_straggler")
            and "stragglers given less" not in s["placement_reason"] and all_on_current(s),
            timeout_s=200, what="expert-1 no longer flagged, on a placement that gives it its share again")
        node = _experts(recovered)["expert-1"]
        assert node.get("applied_load", node["planned_load"]) == pytest.approx(node["planned_load"]), node
        recovered_at = _computed(recovered)
        share_recovered = _fraction(recovered_at, _computed(after_tokens(recovered_at, "after recovery")),
                                    "expert-1")

        p99_burst, n_burst = latencies.p99_ms(bursts_from, lowered_from)
        p99_lowered, n_lowered = latencies.p99_ms(lowered_from, lowered_to)
        print(f"expert-1 computed {share_before:.1%} of routed tokens before, {share_after:.1%} lowered, "
              f"{share_recovered:.1%} recovered; planned load {nodes['expert-1']['planned_load']:.1%}, applied "
              f"{nodes['expert-1']['applied_load']:.1%}; hop p99 expert-0 {nodes['expert-0']['hop_p99_us']:.0f} us, "
              f"expert-1 {nodes['expert-1']['hop_p99_us']:.0f} us; request p99 under bursts {p99_burst:.0f} ms "
              f"({n_burst} requests) before the share moved, {p99_lowered:.0f} ms ({n_lowered}) after")
        assert share_after < share_before - 0.05, (share_before, share_after)
        assert share_recovered > share_after + 0.05, (share_after, share_recovered)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        os.kill(victim, signal.SIGCONT)
        mesh.close()
