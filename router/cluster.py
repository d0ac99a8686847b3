"""The router's control plane: a live view of the cluster from etcd, leader election, placement.

Every router replica watches ``/moemesh/<cluster>/`` (node records, the leader key, the placement)
into a :class:`~moemesh.control.cluster_view.ClusterView`, which the Inference service reads without
touching etcd. Every replica
campaigns for the leader key every TTL/2; the leader alone writes placement, with compare-and-swap.

The leader plans placement (``router/planner.py``) over the live expert nodes: not draining, and not
``down`` by its health watch (``router/expert_health.py``, which notices a killed node long before
its lease expires). It re-plans

* at once when the placement cannot serve: none yet, an expert without a live replica, a replica on a
  node that died or is draining (kept replicas stay where they are; orphans go to free slots);
* when expert nodes joined (after ``settle_s`` without further joins, so nodes starting together are
  planned over together): sticky to the previous placement, but the newcomers take load;
* every ``rebalance_interval_s``, on the routed-token counts the attention nodes report (their Load
  RPC), moving the fewest replicas that reach ``min_balance`` (``router/min_moves.py``; none when
  re-sharing suffices): published only when replicas move or shares change by more than
  ``placement_state.SHARE_CHANGE``, and not while attention nodes are still switching to the last version.
  The planner runs in a worker thread: the minimal-move program may take seconds on large layers.

Applying a version without pausing service is the nodes' part: expert nodes load what is new and keep
what they lose until every attention node serves the new version; attention nodes switch between steps
once every expert node holds its share (``moemesh/control/cluster_view.py``).

What expert node records must carry for this (``capacity``)::

    {"moe_layers": [1, 2, ...],   # the model's MoE layer indices (ModelConfig.moe_layers)
     "n_routed_experts": 64,      # routed experts per MoE layer
     "slots": 16,                 # optional: experts per MoE layer the node can host; without it the leader
                                  # sizes slots so one node loss is survived (placement.default_expert_slots)
     "checkpoint": "9f2c..."}     # optional: moemesh.model.checkpoint.checkpoint_fingerprint of its model

Nodes that disagree on ``moe_layers``/``n_routed_experts``/``checkpoint`` get no placement (logged once).
When to re-plan is decided by the pure ``router/replan.py``; this module does the I/O around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from moemesh.control.cluster_view import ClusterView
from moemesh.control.etcd import Registry, RegistryError
from moemesh.control.placement import default_expert_slots
from moemesh.control.events import ClusterEvent, NodeChanged, NodeDown, NodeUp
from moemesh.control.records import NodeRecord
from moemesh.control.servability import Servability, live_expert_nodes, min_slots, placement_servability
from moemesh.logs import get_logger

from .expert_health import ExpertHealth
from .placement_state import (loads_matrix, placement_problem, placement_record, planned_nodes, previous_holders,
                              publish_reason, read_placement, version_of)
from .planner import DEFAULT_MIN_BALANCE, PlanError, plan_placement
from .replan import Look, Timers, decide_replan
from .straggler_shares import lower_straggler_shares

log = get_logger("moemesh.router.cluster")
TICK_S = 1.0  # the watch's quiet tick (the router only acts on events; ticks are ignored)
PLAN_BUDGET_S = 20.0  # the minimal-move program's time over all layers of one leader re-plan (router/planner.py)


def model_shape(experts: list[NodeRecord]) -> tuple[tuple[int, ...], int] | str:
    """``(moe_layers, n_routed_experts)`` agreed by the expert records' capacity, or why not."""
    shapes = {}
    for record in experts:
        cap = record.capacity
        if cap is None or not cap.moe_layers or cap.n_routed_experts is None:
            return (f"expert node {record.id} does not publish capacity.moe_layers (MoE layer indices) and "
                    f"capacity.n_routed_experts (an int >= 1) in its record")
        shapes.setdefault((tuple(sorted(set(cap.moe_layers))), cap.n_routed_experts, cap.checkpoint or ""),
                          []).append(record.id)
    if len(shapes) > 1:
        detail = "; ".join(f"{ids}: {len(s[0])} MoE layers x {s[1]} experts, checkpoint {s[2] or '?'}"
                           for s, ids in shapes.items())
        return f"expert nodes disagree on the model ({detail}): are they serving the same checkpoint?"
    layers, n, _ = next(iter(shapes))
    return layers, n


@dataclass(frozen=True)
class PlacementPolicy:
    """How the leader plans (router flags of the same names)."""

    settle_s: float = 1.0  # wait this long after the last expert node joined before planning over it
    rebalance_interval_s: float = 30.0  # re-plan on measured loads this often; 0 = only on membership changes
    min_balance: float = DEFAULT_MIN_BALANCE  # re-plans move the fewest replicas reaching this mean/max node load
    replicate: bool = True  # spare slots take replicas of hot experts


LoadsFetcher = Callable[[], Awaitable[tuple[dict[int, list[float]], int]]]  # -> ({layer: tokens per expert}, nodes)


async def _no_loads() -> tuple[dict[int, list[float]], int]:
    return {}, 0


class ControlPlane:
    """Keeps a ClusterView current, campaigns for leadership, and (as leader) plans and writes placement."""

    def __init__(self, registry: Registry, router_id: str, view: ClusterView, *,
                 campaign_interval_s: float | None = None, policy: PlacementPolicy | None = None,
                 fetch_loads: LoadsFetcher | None = None, tls=None, fetch_stragglers=None):
        self.registry = registry
        self.router_id = router_id
        self.view = view
        self.campaign_interval_s = campaign_interval_s or max(0.2, registry.ttl_s / 2)
        self.policy = policy = policy or PlacementPolicy()
        self.fetch_loads = fetch_loads or _no_loads
        # fetch_stragglers(expert records) -> ids of the slow ones (router/hop_status.py::straggler_ids)
        self.fetch_stragglers = fetch_stragglers
        self.experts_changed = asyncio.Event()  # an expert node's record changed, or its health did
        self.experts_joined_at = time.monotonic()  # a new expert node id appeared (plans wait settle_s after)
        self.health = ExpertHealth(self.experts_changed.set, tls)
        self.is_leader = False
        self.placements_written = 0
        self._last_problem: str | None = None
        self._timers = Timers(time.monotonic() + policy.rebalance_interval_s)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def prime(self) -> None:
        """Load the view from one listing of etcd (RegistryError if etcd does not answer)."""
        for event in await self.registry.read_cluster():
            self._apply(event)
        self.view.synced = True

    def _apply(self, event: ClusterEvent) -> None:
        node = event.record if isinstance(event, (NodeUp, NodeChanged)) else None
        role = node.role if node is not None else event.role if isinstance(event, NodeDown) else None
        if node is not None and role == "expert" and self.view.node(role, node.id) is None:
            self.experts_joined_at = time.monotonic()
        if self.view.apply(event) and role == "expert":
            self.experts_changed.set()

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
                async for batch in self.registry.watch_cluster(TICK_S):
                    for event in batch:
                        self._apply(event)
                        self.view.synced = True
                return  # the registry was closed
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the view die: log and watch again
                log.exception("router_watch_failed")
                await asyncio.sleep(1.0)

    # ---- election and placement ----------------------------------------------------
    async def _lead(self) -> None:
        while not self._stopping:
            wait_s = self.campaign_interval_s
            self.experts_changed.clear()  # changes from here on wake the next round
            try:
                leader = await self.registry.campaign_leader(self.router_id)
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
                self._timers = replace(self._timers, next_rebalance=time.monotonic() + self.policy.rebalance_interval_s)
            if leader:
                self.health.sync(self.view.records("expert"))
                try:
                    wait_s = min(wait_s, await self._reconcile())
                except RegistryError as exc:
                    log.warning("router_placement_failed", error=str(exc))
                except Exception:
                    log.exception("router_placement_error")
            try:
                await asyncio.wait_for(self.experts_changed.wait(), max(0.05, wait_s))
            except asyncio.TimeoutError:
                pass

    def _note(self, problem: str | None, **fields) -> None:
        """Log a placement problem once (until it changes)."""
        if problem != self._last_problem and problem is not None:
            log.warning("router_placement_blocked", reason=problem, **fields)
        self._last_problem = problem

    def live_experts(self) -> list[NodeRecord]:
        """Expert nodes a placement may use: registered, not draining or failed, not down by the health watch."""
        return live_expert_nodes(self.view.records("expert"), self.health.down)

    def servability(self) -> Servability | None:
        """Whether the stored placement can serve over the live expert nodes (``moemesh.control.servability``).

        Only the leader watches expert nodes' health; another replica sees a killed node only when its lease
        expires, and until then forwards requests, which the attention nodes answer the same way."""
        return placement_servability(self.view.placement, self.view.records("expert"), self.health.down)

    async def _reconcile(self) -> float:
        """As leader: re-plan when ``decide_replan`` says so and write the placement. Returns seconds until the
        next look."""
        experts = self.live_experts()
        if not experts:
            return self.campaign_interval_s
        shape = model_shape(experts)
        if isinstance(shape, str):
            self._note(shape)
            return self.campaign_interval_s
        moe_layers, n_experts = shape
        node_ids = [r.id for r in experts]
        entry = await self.registry.placement_entry()
        current, malformed = read_placement(None if entry is None else entry.value)
        version = version_of(None if entry is None else entry.value)
        problem = malformed or placement_problem(current, moe_layers, n_experts, node_ids)
        look = Look(entry is not None, problem, tuple(sorted(set(node_ids) - planned_nodes(current))),
                    self.experts_joined_at, tuple(self.view.attention_behind(version)))
        policy = self.policy
        decision = decide_replan(look, self._timers, time.monotonic(), settle_s=policy.settle_s,
                                 rebalance_interval_s=policy.rebalance_interval_s, min_balance=policy.min_balance,
                                 campaign_interval_s=self.campaign_interval_s)
        if decision.kind == "defer" and decision.timers.deferred_for != self._timers.deferred_for:
            # once per set of lagging nodes, not every look
            log.info("router_rebalance_deferred", reason="attention nodes still switching",
                     nodes=list(decision.timers.deferred_for))
        self._timers = decision.timers
        if decision.kind == "idle":
            self._last_problem = None
        if decision.kind != "plan":
            return decision.wait_s
        reason = decision.reason
        observed, reporting = await self.fetch_loads()
        loads = loads_matrix(observed, moe_layers, n_experts)
        slots = min_slots(experts) or default_expert_slots(n_experts, len(node_ids))
        previous = previous_holders(current, moe_layers, n_experts, node_ids)
        try:
            plan = await asyncio.to_thread(self._plan, loads, len(node_ids), min(slots, n_experts), previous,
                                           decision.min_balance, [r.zone for r in experts])
        except PlanError as exc:
            self._note(str(exc), nodes=node_ids, slots=slots)
            return self.campaign_interval_s
        window = int(sum(sum(row) for row in observed.values()))
        placement = placement_record(plan, version + 1, moe_layers, node_ids, reason, window)
        if self.fetch_stragglers is not None:  # stragglers get less of what they share (router/straggler_shares.py)
            lowered = lower_straggler_shares(placement, await self.fetch_stragglers(experts),
                                             loads=dict(zip(moe_layers, loads)))
            if lowered is not placement:
                placement, reason = lowered, lowered.stats.reason  # the reason says so
        if not decision.publish_always:
            why = publish_reason(current, placement)
            if why is None:
                log.info("router_rebalance_skipped", balancedness=min(plan.layers[i].balancedness
                                                                      for i in range(len(plan.layers))),
                         attention_nodes_reporting=reporting)
                return self.campaign_interval_s
            reason = f"{reason}: {why}"
            placement = replace(placement, stats=replace(placement.stats, reason=reason))
        for warning in plan.warnings:  # every write: a zone exposure lasts until slots or nodes are added
            log.warning("router_placement_zone_exposed", warning=warning)
        written = await self.registry.write_placement(placement, 0 if entry is None else entry.mod_revision)
        if not written:
            log.info("router_placement_raced", version=placement.version,
                     note="placement changed under us; looking again")
            return 0.05
        self.placements_written += 1
        self._last_problem = None
        log.info("router_placement_written", version=placement.version, reason=reason, nodes=node_ids,
                 moe_layers=len(moe_layers), experts=n_experts, slots=slots, moved=plan.moved,
                 balancedness=round(min(lp.balancedness for lp in plan.layers), 4), window_tokens=window,
                 attention_nodes_reporting=reporting)
        return self.campaign_interval_s

    def _plan(self, loads, n_nodes: int, slots: int, previous, min_balance: float, zones):
        """Plan sticky to ``previous``; afresh when the previous placement does not fit (e.g. fewer slots now)."""
        if previous is not None:
            try:
                return plan_placement(loads, n_nodes, slots, previous, min_balance, self.policy.replicate,
                                      zones=zones, budget_s=PLAN_BUDGET_S)
            except PlanError as exc:
                log.info("router_previous_placement_unusable", error=str(exc))
        return plan_placement(loads, n_nodes, slots, None, min_balance, self.policy.replicate, zones=zones)
