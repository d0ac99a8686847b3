"""How many ping-pong micro-batches a step runs, chosen from measured costs (pure).

``--micro-batches auto`` splits a step only when it pays. Ping-pong (MegaScale-Infer) runs micro-batch
i's attention while micro-batch j's routed experts are away, so it hides up to min(attention, hop) per
MoE layer; it costs what does not shrink with the rows: each extra micro-batch is one more pass over the
expert weights on the expert node (memory-bound decode reads them whole for one row or for sixty) and
one more hop's fixed cost (framing, the network legs, the node's decode and encode).

Per MoE layer, measured by the attention node on steps run whole (m = 1), in one batch-size bucket:

- ``attn_s`` A: its own busy time between two combines: attention, gate, dispatch, shared experts;
- ``wait_s`` W: what it waited in combine for the remote experts (the hop nothing hid);
- ``send_s`` S: its own time in one dispatch call (routing tables, the copy out, framing the messages);
- ``compute_s`` C: an expert node's compute for one message, as the nodes report it per hop;
- ``fixed_s`` F: a hop's size-independent latency (hop minus compute at the smallest batch seen: an
  over-estimate until a small batch was seen, so the model errs towards not splitting; probes correct it).

The model of a layer run as m micro-batches (:func:`layer_time_s`), m = 1 being A + W:

- busy = A + (m - 1) S: the attention node still does all the attention, and one more dispatch per
  extra micro-batch;
- chain = A / m + h(m): one micro-batch's own attention, then its hop, whose fixed part
  ``min(W, F + C)`` stays whole while the rest shrinks with its rows: h(m) = fixed + (W - fixed) / m;
- experts = m C: the expert node reads its weights once per micro-batch;
- the layer takes the longest of the three (the pipeline's bottleneck).

More than two micro-batches win when the hop is long against attention (MegaScale-Infer's condition
m >= 2 (1 + Tc / Tf): the ring needs enough micro-batches in flight to cover one round trip);
:func:`choose` compares every m up to ``max_m``. The model cannot see contention (attention and
experts sharing one machine's cores or memory bandwidth), so a measured step time, when this bucket has
one for both settings, wins over it: the engine probes the setting it is not using now and then
(:func:`probe`) so those measurements stay current.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SWITCH_MARGIN = 0.05  # another setting must be this much faster than the current one: no flapping between equals


@dataclass(frozen=True)
class LayerCosts:
    """One MoE layer's costs at this bucket's batch, run whole (seconds)."""

    attn_s: float
    wait_s: float
    send_s: float
    compute_s: float
    fixed_s: float

    def __post_init__(self) -> None:
        for name in ("attn_s", "wait_s", "send_s", "compute_s", "fixed_s"):
            if not getattr(self, name) >= 0.0:  # also refuses NaN
                raise ValueError(f"LayerCosts.{name} must be >= 0 seconds, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Choice:
    micro_batches: int
    reason: str  # why, in words an operator reads in the log


def layer_time_s(costs: LayerCosts, m: int) -> float:
    """Predicted seconds of one MoE layer for the whole batch run as ``m`` micro-batches (see the module doc)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    a, w, s, c, f = costs.attn_s, costs.wait_s, costs.send_s, costs.compute_s, costs.fixed_s
    if m == 1:
        return a + w
    fixed = min(w, f + c)
    busy = a + (m - 1) * s
    chain = a / m + fixed + (w - fixed) / m
    return max(busy, chain, m * c)


def relative_times(costs: LayerCosts, measured: Mapping[int, float], max_m: int) -> dict[int, float]:
    """Each m in 1..max_m's step time relative to m = 1: measured when both m and 1 were, else the model's,
    scaled by how far off the model was for the splits that were measured (the worst of them: what slowed
    one split, contention, slows the others too)."""
    base = layer_time_s(costs, 1)
    model = {m: layer_time_s(costs, m) / base if base > 0 else 1.0 for m in range(1, max_m + 1)}
    seen = {m: measured[m] / measured[1] for m in model if m in measured and measured.get(1, 0.0) > 0}
    errors = [seen[m] / model[m] for m in seen if m >= 2 and model[m] > 0]
    scale = max(errors) if errors else 1.0
    return {m: seen[m] if m in seen else (1.0 if m == 1 else model[m] * scale) for m in model}


def choose(costs: LayerCosts | None, measured: Mapping[int, float], max_m: int, current: int, remote: bool,
           margin: float = SWITCH_MARGIN) -> Choice:
    """The micro-batches for this bucket's next steps.

    ``measured``: m -> this bucket's measured step seconds at that setting (moving averages; missing ones
    are predicted); ``max_m``: at most this many (no more than the step's sequences); ``current``: what
    the bucket runs now, kept unless another setting is ``margin`` faster."""
    if not remote:
        return Choice(1, "local experts: no hop to hide")
    if max_m <= 1:
        return Choice(1, "one sequence: nothing to split")
    if costs is None:
        return Choice(1, "measuring this batch size whole first")
    rel = relative_times(costs, measured, max_m)
    best = min(rel, key=lambda m: (rel[m], m))  # ties: fewer micro-batches
    current = min(max(current, 1), max_m)
    if best != current and rel[best] < rel[current] * (1.0 - margin):
        pick = best
    else:
        pick = current
    source = "measured" if pick in measured and 1 in measured else "predicted"
    return Choice(pick, f"{source} {rel[pick]:.2f}x of one micro-batch's step time "
                        f"(A {costs.attn_s * 1e6:.0f} us, W {costs.wait_s * 1e6:.0f} us, S {costs.send_s * 1e6:.0f} "
                        f"us, C {costs.compute_s * 1e6:.0f} us, F {costs.fixed_s * 1e6:.0f} us per layer)")


def probe(choice: int, costs: LayerCosts | None, measured: Mapping[int, float], max_m: int) -> int:
    """The setting a probe step runs instead of ``choice``: 1 when splitting, else the best split (by
    :func:`relative_times`), so the comparison :func:`choose` makes stays measured."""
    if choice != 1 or max_m <= 1 or costs is None:
        return 1
    rel = relative_times(costs, {m: s for m, s in measured.items() if m == 1}, max_m)  # the model alone
    return min((m for m in rel if m >= 2), key=lambda m: (rel[m], m))


def bucket_of(tokens: int) -> int:
    """A step's batch-size bucket: powers of two of its token count (1, 2-3, 4-7, 8-15, ...)."""
    if tokens < 1:
        raise ValueError(f"a step has at least one token, got {tokens}")
    return tokens.bit_length()
