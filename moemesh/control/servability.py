"""Can the live placement serve, and if not, will a re-plan fix it? One pure verdict for router and attention nodes.

Pure (no I/O, no clock). A logical expert is *missing* when none of its replicas is on a live expert node
(:func:`moemesh.control.placement.missing_experts`). Then the rule that both the router (for new requests) and
the attention nodes (for a step whose experts are unreachable) follow is:

* ``serving``: nothing is missing;
* ``degraded``: experts are missing, but the live expert nodes have slots for every expert (``nodes x slots
  >= experts``, what the planner needs): the leader re-plans them onto the survivors within milliseconds of
  noticing, so a step waits (bounded by ``EngineConfig.expert_wait_s``) for that placement and re-runs;
* ``unservable``: experts are missing and no placement over the live nodes could host them all: waiting
  cannot help until a node joins or returns, so requests fail at once with UNAVAILABLE naming the missing
  experts and what to do (:attr:`Servability.message`), and clients are told not to retry
  (:data:`moemesh.wire.status.NO_RETRY`). Service resumes by itself: a returning node makes the leader
  re-plan, and the verdict turns ``serving`` again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from moemesh.control.placement import describe_missing, missing_experts
from moemesh.control.records import NodeRecord, PlacementRecord
from moemesh.errors import UnservableError

FIX = "add an expert node or raise --expert-slots; the mesh resumes by itself when a node returns"
NOT_LIVE = ("draining", "failed")  # expert node statuses a placement may not use


def min_slots(experts: Sequence[NodeRecord]) -> int | None:
    """The smallest ``capacity.slots`` among the records that publish one (None if none does)."""
    slots = [r.capacity.slots for r in experts if r.capacity is not None and r.capacity.slots is not None]
    return min(slots) if slots else None


def live_expert_nodes(records: Sequence[NodeRecord], down: Collection[str] = ()) -> list[NodeRecord]:
    """Expert nodes a placement may use: registered, not draining or failed, not in ``down`` (ids)."""
    return [r for r in records if r.role == "expert" and r.status not in NOT_LIVE and r.id not in down]


@dataclass(frozen=True)
class Servability:
    state: Literal["serving", "degraded", "unservable"]
    missing: Mapping[int, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    live_nodes: int = 0  # live expert nodes
    slots: int = 0  # slots per MoE layer over the live nodes (what a re-plan could fill)
    n_experts: int = 0  # routed experts per MoE layer

    @property
    def message(self) -> str:
        """What is wrong and what to do ('' when serving)."""
        if self.state == "serving":
            return ""
        gaps = f"no live expert node hosts {describe_missing(self.missing)}"
        if self.state == "degraded":
            return f"{gaps}; re-planning them onto the {self.live_nodes} live expert node(s)"
        return (f"the mesh cannot serve: {gaps}, and the {self.live_nodes} live expert node(s) have {self.slots} "
                f"slot(s) per MoE layer for {self.n_experts} experts: {FIX}")

    def error(self) -> UnservableError | None:
        return UnservableError(self.message) if self.state == "unservable" else None


def judge(missing: Mapping[int, Sequence[int]], live_nodes: int, slots_per_node: int | None,
          n_experts: int) -> Servability:
    """The verdict (module docstring) for these missing experts; ``slots_per_node`` None: every expert fits."""
    slots = live_nodes * min(n_experts if slots_per_node is None else slots_per_node, n_experts)
    if not missing:
        state = "serving"
    elif slots >= n_experts:
        state = "degraded"
    else:
        state = "unservable"
    frozen = MappingProxyType({layer: tuple(ids) for layer, ids in sorted(missing.items())})
    return Servability(state, frozen, live_nodes, slots, n_experts)


def placement_servability(placement: PlacementRecord | None, experts: Sequence[NodeRecord],
                          down: Collection[str] = ()) -> Servability | None:
    """The verdict for the stored ``placement`` over the expert node ``experts`` (records) less ``down`` (ids).

    None without a placement (the mesh is starting: nothing is known to be missing). The model's shape is the
    placement's (the leader writes every expert of every MoE layer), widened by the nodes' published capacity.
    """
    if placement is None or not placement.layers:
        return None
    live = live_expert_nodes(experts, down)
    n_experts = max([e + 1 for es in placement.layers.values() for e in es] +
                    [r.capacity.n_routed_experts for r in experts
                     if r.capacity is not None and r.capacity.n_routed_experts is not None])
    replicas = {(layer, e): nodes for layer, es in placement.layers.items() for e, nodes in es.items()}
    missing = missing_experts(replicas, sorted(placement.layers), n_experts, {r.id for r in live})
    return judge(missing, len(live), min_slots(live), n_experts)
