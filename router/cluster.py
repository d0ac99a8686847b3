"""The router's control plane: a live view of the cluster from etcd, leader election, placement.

Every router replica watches ``/moemesh/<cluster>/`` (node records, the leader key, the placement)
into a :class:`ClusterView`, which the Inference service reads without touching etcd. Every replica
campaigns for the leader key every TTL/2; the leader alone writes placement, with compare-and-swap.

The leader plans placement (``router/planner.py``) over the live expert nodes: not draining, and not
``down`` by its health watch (``router/expert_health.py``, which notices a killed node long before
its lease expires). It re-plans

* at once when the placement cannot serve: none yet, an expert without a live replica, a replica on a
  node that died or is draining (kept replicas stay where they are; orphans go to free slots);
* when expert nodes joined (after ``settle_s`` without further joins, so nodes starting together are
  planned over together): sticky to the previous placement, but the newcomers take load;
* every ``rebalance_interval_s``, on the routed-token counts the attention nodes report (their Load
  RPC): published only when replicas move (the fresh plan beats keeping by ``min_gain``) or shares
  change by more than ``placement_state.SHARE_CHANGE``, and not while attention nodes are still
  switching to the last version.

Applying a version without pausing service is the nodes' part: expert nodes load what is new and keep
what they lose until every attention node serves the new version; attention nodes switch between steps
once every expert node holds its share (``moemesh/control/cluster_view.py``).

What expert node records must carry for this (``capacity``)::

    {"moe_layers": [1, 2, ...],   # the model's MoE layer indices (ModelConfig.moe_layers)
     "n_routed_experts": 64,      # routed experts per MoE layer
     "slots": 16,                 # optional: experts per MoE layer the node can host; enables replicas
     "checkpoint": "9f2c..."}     # optional: moemesh.model.checkpoint.checkpoint_fingerprint of its model

Nodes that disagree on ``moe_layers``/``n_routed_experts``/``checkpoint`` get no placement (logged once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from moemesh.control.cluster_view import attention_behind
from moemesh.control.etcd import Registry, RegistryError, WatchEvent
from moemesh.logs import get_logger

from .expert_health import ExpertHealth
from .placement_state import (loads_matrix, placement_problem, placement_record, planned_nodes, previous_holders,
                              publish_reason)
from .planner import DEFAULT_MIN_GAIN, PlanError, plan_placement

log = get_logger("moemesh.router.cluster")


class ClusterView:
    """What etcd says now: node records by (role, id), the leader's id, the placement (plain dicts)."""

    def __init__(self, registry_keys):
        self.keys = registry_keys
        self.nodes: dict[tuple[str, str], dict] = {}
        self.leader: str | None = None
        self.placement: dict | None = None
        self.synced = False  # True once a snapshot of etcd has been applied
        self.experts_changed = asyncio.Event()
        self.experts_joined_at = time.monotonic()  # a new expert node id appeared (plans wait settle_s after)

    def apply(self, kind: str, key: str, value: Any) -> None:
        """Apply one put/delete (from a watch or a listing) to the view."""
        if key == self.keys.leader():
            self.leader = value if kind == "put" and isinstance(value, str) else None
            return
        if key == self.keys.placement():
            self.placement = value if kind == "put" and isinstance(value, dict) else None
            return
        parsed = self.keys.parse_node(key)
        if parsed is None:
            return
        before = self.nodes.get(parsed)
        if parsed[0] == "expert" and before is None and kind == "put":
            self.experts_joined_at = time.monotonic()
        if kind == "put" and isinstance(value, dict):
            self.nodes[parsed] = {**value, "id": parsed[1], "role": parsed[0]}
        else:
            self.nodes.pop(parsed, None)
        if parsed[0] == "expert" and self.nodes.get(parsed) != before:
            self.experts_changed.set()

    def apply_event(self, event: WatchEvent) -> None:
        self.apply(event.kind, event.key, event.value)

    def records(self, role: str | None = None) -> list[dict]:
        """Node records (of one role), sorted by (role, id)."""
        return [r for (ro, _), r in sorted(self.nodes.items()) if role is None or ro == role]

    def ready_attention_nodes(self) -> list[dict]:
        return [r for r in self.records("attn") if r.get("status") == "ready" and r.get("address")]

    def placement_version(self) -> int:
        version = (self.placement or {}).get("version", 0)
        return version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else 0


def model_shape(experts: list[dict]) -> tuple[tuple[int, ...], int] | str:
    """``(moe_layers, n_routed_experts)`` agreed by the expert records' capacity, or why not."""
    shapes = {}
    for record in experts:
        cap = record.get("capacity") or {}
        layers, n = cap.get("moe_layers"), cap.get("n_routed_experts")
        ok = (isinstance(layers, list) and layers and all(isinstance(x, int) and x >= 0 for x in layers)
              and isinstance(n, int) and not isinstance(n, bool) and n >= 1)
        if not ok:
            return (f"expert node {record['id']} does not publish capacity.moe_layers (MoE layer indices) and "
                    f"capacity.n_routed_experts (an int >= 1) in its record")
        checkpoint = cap.get("checkpoint") if isinstance(cap.get("checkpoint"), str) else ""
        shapes.setdefault((tuple(sorted(set(layers))), n, checkpoint), []).append(record["id"])
    if len(shapes) > 1:
        detail = "; ".join(f"{ids}: {len(s[0])} MoE layers x {s[1]} experts, checkpoint {s[2] or '?'}"
                           for s, ids in shapes.items())
        return f"expert nodes disagree on the model ({detail}): are they serving the same checkpoint?"
    layers, n, _ = next(iter(shapes))
    return layers, n


def min_slots(experts: list[dict]) -> int | None:
    """The smallest ``capacity.slots`` among the records that publish one (None if none does)."""
    slots = [(r.get("capacity") or {}).get("slots") for r in experts]
    slots = [s for s in slots if isinstance(s, int) and not isinstance(s, bool)]
    return min(slots) if slots else None


@dataclass(frozen=True)
class PlacementPolicy:
    """How the leader plans (router flags of the same names)."""

    settle_s: float = 1.0  # wait this long after the last expert node joined before planning over it
    rebalance_interval_s: float = 30.0  # re-plan on measured loads this often; 0 = only on membership changes
    min_gain: float = DEFAULT_MIN_GAIN  # balancedness gain that justifies moving replicas on a periodic re-plan
    replicate: bool = True  # spare slots take replicas of hot experts


LoadsFetcher = Callable[[], Awaitable[tuple[dict[int, list[float]], int]]]  # -> ({layer: tokens per expert}, nodes)


async def _no_loads() -> tuple[dict[int, list[float]], int]:
    return {}, 0


class ControlPlane:
    """Keeps a ClusterView current, campaigns for leadership, and (as leader) plans and writes placement."""

    def __init__(self, registry: Registry, router_id: str, view: ClusterView, *,
                 campaign_interval_s: float | None = None, policy: PlacementPolicy | None = None, fetch_loads: LoadsFetcher | None = None, tls=None):
        self.registry = registry
        self.keys = registry.keys
        self.router_id = router_id
        self.view = view
        self.campaign_interval_s = campaign_interval_s or max(0.2, registry.ttl_s / 2)
        self.policy = policy = policy or PlacementPolicy()
        self.fetch_loads = fetch_loads or _no_loads
        self.health = ExpertHealth(self.view.experts_changed.set, tls)
        self.is_leader = False
        self.placements_written = 0
        self._last_problem: str | None = None
        self._next_rebalance = time.monotonic() + policy.rebalance_interval_s
        self._deferred_for: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def prime(self) -> None:
        """Load the view from one listing of etcd (RegistryError if etcd does not answer)."""
        for key, value in (await self.registry.list(self.keys.root)).items():
            self.view.apply("put", key, value)
        self.view.synced = True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(), name="router-watch"),
                       loop.create_task(self._lead(), name="router-leader")]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:
                pass
        self._tasks = []
        await self.health.close()

    # ---- the watch ---------------------------------------------------------------
    async def _watch(self) -> None:
        while not self._stopping:
            try:
                async for event in self.registry.watch_prefix(self.keys.root):
                    self.view.apply_event(event)
                    self.view.synced = True
                return  # the registry was closed
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the view die: log and watch again
                log.exception("router_watch_failed")
                await asyncio.sleep(1.0)

    # ---- election and placement ----------------------------------------------------
    async def _lead(self) -> None:
        leader_key = self.keys.leader()
        while not self._stopping:
            wait_s = self.campaign_interval_s
            self.view.experts_changed.clear()  # changes from here on wake the next round
            try:
                leader = await self.registry.campaign(leader_key, self.router_id)
            except RegistryError as exc:
                leader = False
                if self.is_leader:
                    log.warning("router_campaign_failed", error=str(exc))
            if leader != self.is_leader:
                log.info("router_leadership", leader=leader, router_id=self.router_id)
                self.is_leader = leader
                if not leader:
                    self.health.sync([])  # only the leader watches expert nodes
                self._last_problem = None
                self._next_rebalance = time.monotonic() + self.policy.rebalance_interval_s
            if leader:
                self.health.sync(self.view.records("expert"))
                try:
                    wait_s = min(wait_s, await self._reconcile())
                except RegistryError as exc:
                    log.warning("router_placement_failed", error=str(exc))
                except Exception:
                    log.exception("router_placement_error")
            try:
                await asyncio.wait_for(self.view.experts_changed.wait(), max(0.05, wait_s))
            except asyncio.TimeoutError:
                pass

    def _note(self, problem: str | None, **fields) -> None:
        """Log a placement problem once (until it changes)."""
        if problem != self._last_problem and problem is not None:
            log.warning("router_placement_blocked", reason=problem, **fields)
        self._last_problem = problem

    def live_experts(self) -> list[dict]:
        """Expert nodes a placement may use: registered, not draining or failed, not down by the health watch."""
        return [r for r in self.view.records("expert")
                if r.get("status") not in ("draining", "failed") and r["id"] not in self.health.down]

    async def _reconcile(self) -> float:
        """As leader: re-plan when needed and write the placement. Returns seconds until the next look."""
        experts = self.live_experts()
        if not experts:
            return self.campaign_interval_s
        shape = model_shape(experts)
        if isinstance(shape, str):
            self._note(shape)
            return self.campaign_interval_s
        moe_layers, n_experts = shape
        node_ids = [r["id"] for r in experts]
        entry = await self.registry.get_entry(self.keys.placement())
        current = None if entry is None else entry.value
        problem = placement_problem(current, moe_layers, n_experts, node_ids)
        joined = sorted(set(node_ids) - planned_nodes(current)) if problem is None else []
        now = time.monotonic()
        if problem is not None and current is None:
            settle_left = self.view.experts_joined_at + self.policy.settle_s - now
            if settle_left > 0:  # nodes starting together are planned over together
                return settle_left
            reason, min_gain = problem, self.policy.min_gain
        elif problem is not None:  # a node died or drains: at once
            reason, min_gain = problem, self.policy.min_gain
        elif joined:
            settle_left = self.view.experts_joined_at + self.policy.settle_s - now
            if settle_left > 0:
                return settle_left
            reason, min_gain = f"expert nodes joined: {', '.join(joined)}", 0.0
        elif self.policy.rebalance_interval_s > 0 and now >= self._next_rebalance:
            behind = attention_behind(((r["id"], r) for r in self.view.records("attn")), _version_of(current))
            if behind:
                if behind != self._deferred_for:  # once per set of lagging nodes, not every look
                    log.info("router_rebalance_deferred", reason="attention nodes still switching", nodes=behind)
                self._deferred_for = behind
                return min(self.campaign_interval_s, self.policy.rebalance_interval_s)
            self._deferred_for = []
            self._next_rebalance = now + self.policy.rebalance_interval_s
            reason, min_gain = "periodic rebalance", self.policy.min_gain
        else:
            self._last_problem = None
            wait = self.campaign_interval_s
            if self.policy.rebalance_interval_s > 0:
                wait = min(wait, max(0.05, self._next_rebalance - now))
            return wait
        observed, reporting = await self.fetch_loads()
        loads = loads_matrix(observed, moe_layers, n_experts)
        slots = min_slots(experts) or n_experts
        previous = previous_holders(current, moe_layers, n_experts, node_ids)
        try:
            plan = self._plan(loads, len(node_ids), min(slots, n_experts), previous, min_gain)
        except PlanError as exc:
            self._note(str(exc), nodes=node_ids, slots=slots)
            return self.campaign_interval_s
        version = _version_of(current) + 1
        window = int(sum(sum(row) for row in observed.values()))
        placement = placement_record(plan, version, moe_layers, node_ids, reason, window)
        if problem is None and not joined:
            why = publish_reason(current, placement)
            if why is None:
                log.info("router_rebalance_skipped", balancedness=min(plan.layers[i].balancedness
                                                                      for i in range(len(plan.layers))),
                         attention_nodes_reporting=reporting)
                return self.campaign_interval_s
            placement["stats"]["reason"] = reason = f"{reason}: {why}"
        written = await self.registry.put_if_version(self.keys.placement(), placement,
                                                     0 if entry is None else entry.mod_revision)
        if not written:
            log.info("router_placement_raced", version=version, note="placement changed under us; looking again")
            return 0.05
        self.placements_written += 1
        self._last_problem = None
        log.info("router_placement_written", version=version, reason=reason, nodes=node_ids,
                 moe_layers=len(moe_layers), experts=n_experts, slots=slots, moved=plan.moved,
                 balancedness=round(min(lp.balancedness for lp in plan.layers), 4), window_tokens=window,
                 attention_nodes_reporting=reporting)
        return self.campaign_interval_s


    def _plan(self, loads, n_nodes: int, slots: int, previous, min_gain: float):
        """Plan sticky to ``previous``; afresh when the previous placement does not fit (e.g. fewer slots now)."""
        if previous is not None:
            try:
                return plan_placement(loads, n_nodes, slots, previous, min_gain, self.policy.replicate)
            except PlanError as exc:
                log.info("router_previous_placement_unusable", error=str(exc))
        return plan_placement(loads, n_nodes, slots, None, min_gain, self.policy.replicate)


def _version_of(placement: object) -> int:
    version = placement.get("version") if isinstance(placement, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else 0
