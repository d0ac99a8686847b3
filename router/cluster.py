"""The router's control plane: a live view of the cluster from etcd, leader election, placement.

Every router replica watches ``/moemesh/<cluster>/`` (node records, the leader key, the placement)
into a :class:`ClusterView`, which the Inference service reads without touching etcd. Every replica
campaigns for the leader key every TTL/2; the leader alone writes placement, with compare-and-swap.

The leader writes a placement (``spread_experts`` over the expert nodes present) when there is no
valid one: none yet, one that does not cover the model's experts, or one that names an expert node
that is gone or draining. It waits until the set of expert nodes has been stable for ``settle_s``
first, so nodes starting together are spread over together.

What expert node records must carry for this (``capacity``)::

    {"moe_layers": [1, 2, ...],   # the model's MoE layer indices (ModelConfig.moe_layers)
     "n_routed_experts": 64,      # routed experts per MoE layer
     "slots": 16}                 # optional: experts per MoE layer the node can host; enables replicas

Nodes that disagree on ``moe_layers``/``n_routed_experts`` get no placement (logged once).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from moemesh.etcd import Registry, RegistryError, WatchEvent
from moemesh.logs import get_logger

from .spread import SpreadError, placement_dict, placement_problem, spread_experts

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
        self.experts_changed_at = time.monotonic()

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
        if kind == "put" and isinstance(value, dict):
            self.nodes[parsed] = {**value, "id": parsed[1], "role": parsed[0]}
        else:
            self.nodes.pop(parsed, None)
        if parsed[0] == "expert" and self.nodes.get(parsed) != before:
            self.experts_changed_at = time.monotonic()
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
        shapes.setdefault((tuple(sorted(set(layers))), n), []).append(record["id"])
    if len(shapes) > 1:
        detail = "; ".join(f"{ids}: {len(s[0])} MoE layers x {s[1]} experts" for s, ids in shapes.items())
        return f"expert nodes disagree on the model ({detail}): are they serving the same checkpoint?"
    return next(iter(shapes))


def min_slots(experts: list[dict]) -> int | None:
    """The smallest ``capacity.slots`` among the records that publish one (None if none does)."""
    slots = [(r.get("capacity") or {}).get("slots") for r in experts]
    slots = [s for s in slots if isinstance(s, int) and not isinstance(s, bool)]
    return min(slots) if slots else None


class ControlPlane:
    """Keeps a ClusterView current, campaigns for leadership, and (as leader) writes placement."""

    def __init__(self, registry: Registry, router_id: str, view: ClusterView, *,
                 campaign_interval_s: float | None = None, settle_s: float = 1.0):
        self.registry = registry
        self.keys = registry.keys
        self.router_id = router_id
        self.view = view
        self.campaign_interval_s = campaign_interval_s or max(0.2, registry.ttl_s / 2)
        self.settle_s = settle_s
        self.is_leader = False
        self.placements_written = 0
        self._last_problem: str | None = None
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
                self._last_problem = None
            if leader:
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

    async def _reconcile(self) -> float:
        """As leader: write a placement if the current one is not valid. Returns seconds until next look."""
        experts = [r for r in self.view.records("expert") if r.get("status") != "draining"]
        if not experts:
            return self.campaign_interval_s
        settle_left = self.view.experts_changed_at + self.settle_s - time.monotonic()
        if settle_left > 0:
            return settle_left
        shape = model_shape(experts)
        if isinstance(shape, str):
            self._note(shape)
            return self.campaign_interval_s
        moe_layers, n_experts = shape
        node_ids = [r["id"] for r in experts]
        entry = await self.registry.get_entry(self.keys.placement())
        current = None if entry is None else entry.value
        problem = placement_problem(current, moe_layers, n_experts, node_ids)
        if problem is None:
            self._last_problem = None
            return self.campaign_interval_s
        slots = min_slots(experts)
        try:
            assignment = spread_experts(list(moe_layers), n_experts, node_ids, slots)
        except SpreadError as exc:
            self._note(str(exc))
            return self.campaign_interval_s
        old = current.get("version") if isinstance(current, dict) else None
        version = (old if isinstance(old, int) and not isinstance(old, bool) and old >= 0 else 0) + 1
        placement = placement_dict(version, assignment)
        written = await self.registry.put_if_version(self.keys.placement(), placement,
                                                     0 if entry is None else entry.mod_revision)
        if written:
            self.placements_written += 1
            self._last_problem = None
            replicas = sum(len(ids) for ids in assignment[moe_layers[0]].values())
            log.info("router_placement_written", version=version, reason=problem, nodes=node_ids,
                     moe_layers=len(moe_layers), experts=n_experts, slots=slots, replicas_per_layer=replicas)
        else:
            log.info("router_placement_raced", version=version, note="placement changed under us; looking again")
            return 0.05
        return self.campaign_interval_s
