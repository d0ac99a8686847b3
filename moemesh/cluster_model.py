"""An analytical model of a disaggregated mesh's decode step (pure): tokens/s, TPOT and utilisation from costs.

The costs come from a :class:`Profile`: measured on a machine (``moemesh profile``, :class:`MeasuredProfile`) or
built from published hardware figures (``moemesh/hardware.py``). Per decode step, for A attention nodes of batch
B each, N expert nodes, m micro-batches of b = B / m sequences and context c:

* Ta = attention time of one layer for one micro-batch, ``attn_us(b, c)`` (everything but the routed experts);
* Te = one expert node's routed-expert time of one layer for one micro-batch: it gets A x b x K / N (token,
  expert) assignments over E / N experts, ``expert_us(A b K / N, E / N)``;
* Tc = one dispatch round trip (there and back) of one micro-batch's rows to the N expert nodes,
  ``hop_us(bytes, destinations, N)`` (a token goes to the :func:`destinations` its top-k experts are on).

With ping-pong micro-batches (MegaScale-Infer) each micro-batch cycles attention -> experts -> attention,
so a MoE layer takes ``T_layer = max(m Ta, m Te, Ta + Tc + Te)``: the attention node's work, the expert node's
work, or one micro-batch's round trip, whichever is longest (m = 1 is the plain sequence Ta + Tc + Te).
Where sending costs the attention node's own CPU (the profile's ``hop_busy`` share u of a round trip: gRPC on
a host, 0 for RDMA offload), that part cannot overlap: the attention work is m (Ta + u Tc).
Communication is hidden when m Ta >= Ta + Tc + Te; with Te = Ta = Tf that is MegaScale-Infer's
m >= 2 (1 + Tc / Tf). That needs the expert nodes' work and the wire on hardware of their own: with every process
on one host's cores (``ClusterShape.shared_host``: ``bench --mesh`` and the calibration on a CPU box) the
measured mesh shows no overlap (docs/cluster-model.md), and a layer is m (Ta + R), R the round trip of one
micro-batch's MoE layer with the expert nodes computing (``MeasuredProfile.round_trip``: measured through the
mesh's own backend to 2 expert node processes; Tc + Te where a profile has none). Its CPU seconds (every
process, in the profile's output) are reported, not a bound: the processes cannot spend more CPU in a round trip
than the cores give them in its wall time, so (Ta + W) / cores never exceeds Ta + R. Then

    TPOT = L_moe x T_layer + (L - L_moe) x m x Ta + overhead_us(B)      tokens/s = A x B / TPOT

and the utilisation of attention and expert nodes is m Ta / T_layer and m Te / T_layer over the MoE layers.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class ModelError(ValueError):
    """Bad profile or shape for the cluster model; the message names the field."""


@dataclass(frozen=True)
class ModelShape:
    """What of the model config the step's cost depends on."""

    n_layers: int
    n_moe_layers: int
    hidden_size: int
    top_k: int
    n_experts: int
    act_bytes: float = 2  # bytes per activation value on the wire, mean of there and back (bf16: 2)

    def dispatch_bytes(self, rows: float) -> float:
        """One micro-batch's message to one expert node, there and back: hidden states, ids, weights."""
        return rows * (2 * self.hidden_size * self.act_bytes + self.top_k * 12)


@dataclass(frozen=True)
class ClusterShape:
    attention_nodes: int
    expert_nodes: int
    batch: int  # sequences per attention node
    context: int  # tokens of context per sequence (mean over the decode)
    micro_batches: int = 2
    # Every process of the mesh on one host's cores (``bench --mesh``, the calibration): a micro-batch's round
    # trip then does not overlap the next one's attention (see :func:`predict`).
    shared_host: bool = False

    def check(self) -> None:
        for name in ("attention_nodes", "expert_nodes", "batch", "micro_batches"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 0:
            raise ModelError(f"context must be >= 0, got {self.context}")


class Profile(Protocol):
    hop_busy: float  # share of a round trip the attention node's own CPU spends on it (0: all offloaded)

    def attn_us(self, batch: float, context: float) -> float: ...
    def expert_us(self, assignments: float, hosted: float) -> float: ...
    def hop_us(self, nbytes: float, destinations: float, nodes: int) -> float: ...
    def overhead_us(self, batch: float) -> float: ...


def interp(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted (x, y) points, extended along the end segments, never below 0."""
    if not points:
        raise ModelError("an empty table cannot be interpolated")
    if len(points) == 1:
        return max(0.0, points[0][1])
    xs = [p[0] for p in points]
    i = min(max(bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def monotone(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The closest non-decreasing fit (least squares, pool adjacent violators) through sorted (x, y) points.

    A measured time never falls as the work grows (more rows, batch or bytes); a point below its left neighbour
    is noise (a neighbour held the cores while the smaller point ran), and interpolating through it would bend
    the model's curve down. Pooling the two replaces both with their mean."""
    blocks: list[list[float]] = []  # [sum of y, count] per pooled run
    for _, y in points:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [total / count for total, count in blocks for _ in range(int(count))]
    return [(x, y) for (x, _), y in zip(points, fitted)]


@dataclass(frozen=True)
class MeasuredProfile:
    """Tables measured by ``moemesh profile`` (microseconds), interpolated linearly.

    :meth:`from_json` fits each table non-decreasing (:func:`monotone`) before it interpolates.

    ``attention``: {context: [(batch, us per layer)]}; ``expert``: [(rows, us per MoE layer with every expert in
    one process, K assignments per row)]; ``hop``: [(bytes there and back, us)]; ``overhead``: [(batch, us per
    step outside the layers)].
    """

    attention: dict[int, list[tuple[float, float]]]
    expert: list[tuple[float, float]]
    hop: list[tuple[float, float]]
    overhead: list[tuple[float, float]]
    top_k: int
    hop_busy: float = 0.0
    hop_two: list[tuple[float, float]] | None = None  # (bytes, us) of one message to each of two nodes at once
    # A MoE layer's rows through the mesh's backend to ROUND_TRIP_NODES expert node processes on this host,
    # which compute them: (rows, us) of the round trip and of the nodes' compute per message (the profile also
    # reports every process's CPU time per round trip: it bounds nothing, see the module docstring)
    round_trip: list[tuple[float, float]] | None = None
    round_trip_compute: list[tuple[float, float]] | None = None

    def attn_us(self, batch: float, context: float) -> float:
        contexts = sorted(self.attention)
        by_context = [(float(c), interp(self.attention[c], batch)) for c in contexts]
        return interp(by_context, context)

    def expert_us(self, assignments: float, hosted: float) -> float:
        return interp(self.expert, assignments / self.top_k)  # measured rows carry K assignments each

    def hop_us(self, nbytes: float, destinations: float, nodes: int) -> float:
        """One message to each of ``nodes`` expert nodes at once: measured for one and two, each further node
        adding what the second did."""
        one = interp(self.hop, nbytes)
        if self.hop_two is None or nodes == 1:
            return one
        return one + (nodes - 1) * max(0.0, interp(self.hop_two, nbytes) - one)

    def overhead_us(self, batch: float) -> float:
        return interp(self.overhead, batch)

    def shared_round_trip(self, rows: float, shape: "ClusterShape") -> "SharedRoundTrip | None":
        """The measured round trip of a MoE layer of ``rows`` rows on one host, for the mesh that was measured
        (1 attention process, ROUND_TRIP_NODES expert nodes); None for a profile without it."""
        if self.round_trip is None:
            return None
        if (shape.attention_nodes, shape.expert_nodes) != (1, ROUND_TRIP_NODES):
            raise ModelError(f"--shared-host with this profile predicts the mesh it measured: --attention-nodes 1 "
                             f"--expert-nodes {ROUND_TRIP_NODES}, got {shape.attention_nodes} and "
                             f"{shape.expert_nodes}")
        return SharedRoundTrip(interp(self.round_trip, rows),
                               interp(self.round_trip_compute, rows) if self.round_trip_compute else 0.0)

    @classmethod
    def from_json(cls, data: Any, transport: str = "grpc") -> "MeasuredProfile":
        """A ``moemesh profile --json`` output; ModelError naming what is missing."""
        try:
            attention: dict[int, list[tuple[float, float]]] = {}
            for row in data["attention_us"]:
                attention.setdefault(int(row["context"]), []).append((float(row["batch"]), float(row["us"])))
            hops = data["hop_us"].get(transport)
            if not hops:
                raise ModelError(f"the profile has no hop measurements for transport {transport!r} "
                                 f"(it has: {', '.join(sorted(data['hop_us'])) or 'none'})")
            layers = (data.get("round_trip_us") or {}).get(transport) or []

            def table(key: str) -> list[tuple[float, float]] | None:
                rows = [(float(r["rows"]), float(r[key])) for r in layers if key in r]
                return monotone(sorted(rows)) if rows and len(rows) == len(layers) else None

            return cls({c: monotone(sorted(v)) for c, v in attention.items()},
                       monotone(sorted((float(r["rows"]), float(r["us"])) for r in data["expert_us"])),
                       monotone(sorted((float(r["bytes"]), float(r["us"])) for r in hops)),
                       monotone(sorted((float(r["batch"]), float(r["us"])) for r in data["overhead_us"])),
                       int(data["model"]["top_k"]),
                       sum(float(r.get("busy", 0.0)) for r in hops) / len(hops),
                       monotone(sorted((float(r["bytes"]), float(r["two_nodes_us"])) for r in hops))
                       if all("two_nodes_us" in r for r in hops) else None,
                       table("us"), table("node_compute_us"))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"not a moemesh profile (--json output of `moemesh profile`): {exc!r}") from None


ROUND_TRIP_NODES = 2  # expert node processes `moemesh profile` measures a MoE layer's round trip to


@dataclass(frozen=True)
class SharedRoundTrip:
    """One MoE layer's measured round trip on a shared host (microseconds): the whole of it as the sender waits,
    and the expert nodes' compute inside it."""

    us: float
    compute_us: float


@dataclass(frozen=True)
class Prediction:
    shape: ClusterShape
    tokens_per_s: float
    tpot_ms: float
    layer_us: float
    attention_us: float  # Ta
    expert_us: float  # Te
    hop_us: float  # Tc
    attention_utilisation: float
    expert_utilisation: float
    min_micro_batches: int  # ceil(2 (1 + Tc / Ta)): MegaScale-Infer's bound to hide communication
    bound: str  # "attention", "experts" or "round trip": what sets T_layer

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = asdict(self.shape)
        return out


def destinations(top_k: int, expert_nodes: int) -> float:
    """Expected expert nodes one token's top-k experts land on (uniform routing): N (1 - (1 - 1/N)^K)."""
    return expert_nodes * (1 - (1 - 1 / expert_nodes) ** top_k)


def predict(profile: Profile, model: ModelShape, shape: ClusterShape) -> Prediction:
    """The decode step of ``shape`` (module docstring)."""
    shape.check()
    a, n, m = shape.attention_nodes, shape.expert_nodes, shape.micro_batches
    b = shape.batch / m
    ta = profile.attn_us(b, shape.context)
    te = profile.expert_us(a * b * model.top_k / n, model.n_experts / n)
    tc = profile.hop_us(model.dispatch_bytes(b), destinations(model.top_k, n), n)
    busy = profile.hop_busy * tc  # the attention node's own CPU time in the round trip
    measured = getattr(profile, "shared_round_trip", lambda *_: None)(b, shape) if shape.shared_host else None
    if measured is not None:  # the round trip as measured on this host, expert work and all (module docstring)
        te, tc = measured.compute_us, max(0.0, measured.us - measured.compute_us)
        candidates = {"attention": m * (ta + busy), "experts": m * te, "round trip": m * (ta + measured.us)}
    elif shape.shared_host:  # nothing overlaps: the micro-batches' layers run one after another
        candidates = {"attention": m * (ta + busy), "experts": m * te, "round trip": m * (ta + tc + te)}
    else:
        candidates = {"attention": m * (ta + busy), "experts": m * te, "round trip": ta + tc + te}
    bound = max(candidates, key=lambda k: (candidates[k], k == "round trip"))
    layer = candidates[bound]
    tpot_us = (model.n_moe_layers * layer + (model.n_layers - model.n_moe_layers) * m * ta
               + profile.overhead_us(shape.batch))
    return Prediction(shape, a * shape.batch / tpot_us * 1e6, tpot_us / 1e3, layer, ta, te, tc,
                      candidates["attention"] / layer if layer else 0.0, m * te / layer if layer else 0.0,
                      math.ceil(2 * (1 + tc / ta)) if ta > 0 else 1, bound)


def recommend(profile: Profile, model: ModelShape, *, context: int, tpot_ms: float | None = None,
              attention_nodes: Iterable[int] = range(1, 9), expert_nodes: Iterable[int] = range(1, 9),
              batches: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
              micro_batches: Iterable[int] = (1, 2, 3, 4)) -> Prediction | None:
    """The shape with the most tokens/s per node (attention + expert) within ``tpot_ms`` (if given) that fits
    in memory (a profile's ``misfit(model, shape)``, where it has one); ties go to fewer nodes, then smaller
    batches. None when no shape qualifies."""
    best = None
    for a in attention_nodes:
        for n in expert_nodes:
            for batch in batches:
                for m in micro_batches:
                    if m > batch:
                        continue
                    shape = ClusterShape(a, n, batch, context, m)
                    misfit = getattr(profile, "misfit", None)
                    if misfit is not None and misfit(model, shape) is not None:
                        continue
                    p = predict(profile, model, shape)
                    if tpot_ms is not None and p.tpot_ms > tpot_ms:
                        continue
                    key = (p.tokens_per_s / (a + n), -(a + n), -batch, -m)
                    if best is None or key > best[0]:
                        best = (key, p)
    return None if best is None else best[1]
