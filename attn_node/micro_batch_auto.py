"""Micro-batches per step: fixed, or ``auto``, measured by the engine and decided by attn_node/micro_batch_policy.py.

:class:`AutoMicroBatches` feeds the policy. Around each step the engine calls ``start_step``, ``pick``
and, when the step ran through, ``observe``. It measures, on the host clock only (no device read: with
remote experts every dispatch copies the rows to the host anyway, so host time is device time there):

- per MoE layer, through :class:`LayerClock` (the backend the MoE layers call, wrapping the engine's):
  the attention node's busy time between two combines (A), its time in dispatch (S) and its wait in
  combine (W);
- per hop, the expert nodes' own compute (C) and the rest of the hop (transport): the deltas of the
  hop totals the links record (attn_node/experts/hop_stats.py ``HOPS.totals()``: at once, where the histograms lag);
- the step's seconds, per micro-batch setting.

Costs come from steps run whole (m = 1), per batch-size bucket; a step with no hop means the experts are
local, and the choice is 1. Now and then a step of a bucket runs the other setting
(``micro_batch_policy.probe``), so both settings' measured step times stay current. Right after a bucket's
warm-up every other step does (``EXPLORE_STEPS``), so the first comparison is between steps of alike
contexts, not between the bucket's first (slowest) whole steps and later split ones; the exploration ends
early once two probes agree the other setting is far off (``DECISIVE``). After it, a probe comes
``probe_every`` steps after the choice last changed, and each probe that leaves the choice as it was
doubles the gap to the next (up to ``MAX_PROBE_GAP``): a probe of the losing setting costs a slow step, so
a settled bucket pays for few of them, while a change of choice brings the probes back close together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from moemesh.expert_backend import ExpertBackend
from moemesh.logs import get_logger

from .experts.hop_stats import HOPS
from .micro_batch_policy import LayerCosts, bucket_of, choose, probe
from .scheduler import ScheduledSeq

log = get_logger("moemesh.attn_node.micro_batches")

AUTO = "auto"
MAX_MICRO_BATCHES = 4  # MegaScale-Infer runs 2-4; more adds a hop's fixed cost each for ever less to hide
PROBE_EVERY = 32  # steps of a bucket between probes of the other setting: ~3% of steps run the slower one
WARM_STEPS = 2  # whole steps of a bucket measured before it may split
EXPLORE_STEPS = 8  # then, this many steps alternate with probes (measured on this box: one sample is noise)
DECISIVE = 1.25  # ... unless two probes measured the other setting this many times slower (or faster) already
MAX_PROBE_GAP = 1024  # steps between probes of a settled bucket, at most
ALPHA = 0.25  # moving averages' weight of a new measurement


def check_micro_batches(value: int | str) -> int | str:
    """``value`` if it is ``"auto"`` or an int >= 1; else ValueError saying what to give."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"micro_batches must be 'auto' or an integer >= 1, got {value!r}")


class LayerClock(ExpertBackend):
    """The MoE layers' backend under ``auto``: ``inner``'s, with each layer's host times (dispatch called,
    dispatch returned, combine called, combine returned) kept for the step (reset by :meth:`reset`)."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner
        self.marks: list[tuple[float, float, float, float]] = []

    def reset(self) -> None:
        self.marks = []

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        called = time.perf_counter()
        handle = self.inner.dispatch(layer_id, x, topk_idx, topk_weights)
        return handle, called, time.perf_counter()

    def combine(self, handle):
        inner, called, returned = handle
        waiting = time.perf_counter()
        y = self.inner.combine(inner)
        self.marks.append((called, returned, waiting, time.perf_counter()))
        return y

    def begin_step(self) -> int:
        return self.inner.begin_step()

    def end_step(self) -> None:
        self.inner.end_step()

    def wait_for_change(self, generation: int, timeout_s: float) -> bool:
        return self.inner.wait_for_change(generation, timeout_s)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class LayerTimes:
    busy_s: float  # A: between two combines (for a single MoE layer, from its dispatch: a lower bound)
    send_s: float  # S: in dispatch
    wait_s: float  # W: in combine


def layer_times(marks: Sequence[tuple[float, float, float, float]]) -> LayerTimes | None:
    """Per MoE layer means from one whole step's :class:`LayerClock` marks, or None without any."""
    if not marks:
        return None
    n = len(marks)
    send = sum(returned - called for called, returned, _, _ in marks) / n
    wait = sum(end - waiting for _, _, waiting, end in marks) / n
    if n == 1:
        called, _, waiting, _ = marks[0]
        return LayerTimes(waiting - called, send, wait)
    busy = [marks[i][2] - marks[i - 1][3] for i in range(1, n)]
    return LayerTimes(sum(busy) / len(busy), send, wait)


def hop_totals() -> tuple[float, float, int]:
    """(hop seconds, expert compute seconds, hops) recorded by this process's links so far."""
    return HOPS.totals()


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


@dataclass
class _Bucket:
    attn_s: float | None = None
    send_s: float | None = None
    wait_s: float | None = None
    compute_s: float | None = None
    transport_s: float | None = None  # hop minus compute, per hop
    whole_steps: int = 0
    steps: int = 0
    choice: int = 1
    measured: dict[int, float] = field(default_factory=dict)  # m -> step seconds
    probes: int = 0  # probe steps run
    probe_gap: int = 0  # steps from one probe to the next once explored (0: not yet set)
    next_probe: int = 0  # the step count at which the next probe is due

    def decided(self) -> bool:
        """Two probes measured the other setting far from the current one: no need to explore further."""
        whole, split = self.measured.get(1), [t for m, t in self.measured.items() if m != 1]
        if self.probes < 2 or not whole or not split:
            return False
        ratio = min(split) / whole
        return ratio >= DECISIVE or ratio <= 1.0 / DECISIVE


class FixedMicroBatches:
    """``--micro-batches N``: every step split into N (at most one per sequence)."""

    def __init__(self, m: int):
        self.current = m

    def wrap(self, backend: ExpertBackend) -> ExpertBackend:
        return backend

    def start_step(self) -> None:
        pass

    def pick(self, scheduled: list[ScheduledSeq]) -> int:
        return self.current

    def observe(self, scheduled: list[ScheduledSeq], m: int, step_s: float) -> None:
        pass


class AutoMicroBatches:
    """``--micro-batches auto``: per batch-size bucket, the policy's choice from what the steps measured."""

    def __init__(self, max_m: int = MAX_MICRO_BATCHES, probe_every: int = PROBE_EVERY, hops=hop_totals):
        self.max_m, self.probe_every, self._hops = max_m, probe_every, hops
        self.clock: LayerClock | None = None
        self.remote: bool | None = None  # None until a whole step ran: did its experts hop?
        self.current = 1  # the last step's choice (the moemesh_micro_batches gauge)
        self.steps_by_m: dict[int, int] = {}  # steps run per setting, probes included
        self._buckets: dict[int, _Bucket] = {}
        self._hops_at = (0.0, 0.0, 0.0)

    def wrap(self, backend: ExpertBackend) -> ExpertBackend:
        """The backend the MoE layers call: ``backend`` with a clock on its layers."""
        self.clock = LayerClock(backend)
        return self.clock

    def start_step(self) -> None:
        """A model run starts (or re-runs): its marks and hop counts from here."""
        if self.clock is not None:
            self.clock.reset()
        self._hops_at = self._hops()

    def costs(self, bucket: _Bucket) -> LayerCosts | None:
        if bucket.whole_steps < WARM_STEPS or bucket.attn_s is None:
            return None
        # a hop's size-independent cost: its transport at the smallest batch measured (framing and legs
        # barely grow with rows there); the bucket's own until a smaller one is known
        fixed = next((b.transport_s for _, b in sorted(self._buckets.items()) if b.transport_s is not None),
                     bucket.transport_s)
        return LayerCosts(bucket.attn_s, bucket.wait_s, bucket.send_s, bucket.compute_s or 0.0, fixed or 0.0)

    def pick(self, scheduled: list[ScheduledSeq]) -> int:
        tokens = sum(item.num_tokens for item in scheduled)
        key = bucket_of(tokens)
        bucket = self._buckets.setdefault(key, _Bucket())
        max_m = min(self.max_m, len(scheduled))
        costs = self.costs(bucket)
        choice = choose(costs, bucket.measured, max_m, bucket.choice, self.remote is True)
        if choice.micro_batches != bucket.choice:
            log.info("micro_batches_chosen", micro_batches=choice.micro_batches, was=bucket.choice,
                     tokens=f"{1 << (key - 1)}-{(1 << key) - 1}", reason=choice.reason)
            bucket.choice = choice.micro_batches
            bucket.probe_gap = 0  # the probes come back close together
        bucket.steps += 1
        self.current = choice.micro_batches
        if not (self.remote and costs is not None and max_m > 1):
            return choice.micro_batches
        if self._probe_due(bucket):
            bucket.probes += 1
            return probe(choice.micro_batches, costs, bucket.measured, max_m)
        return choice.micro_batches

    def _probe_due(self, bucket: _Bucket) -> bool:
        """Every other step while exploring, then at ``next_probe``, the gap doubling each time (module doc)."""
        if bucket.steps <= WARM_STEPS + EXPLORE_STEPS and not bucket.decided():
            return bucket.steps % 2 == 0
        if bucket.probe_gap == 0:
            bucket.probe_gap, bucket.next_probe = self.probe_every, bucket.steps + self.probe_every
        if bucket.steps < bucket.next_probe:
            return False
        bucket.probe_gap = min(2 * bucket.probe_gap, MAX_PROBE_GAP)
        bucket.next_probe = bucket.steps + bucket.probe_gap
        return True

    def observe(self, scheduled: list[ScheduledSeq], m: int, step_s: float) -> None:
        """A step ran through as ``m`` micro-batches in ``step_s`` seconds (model, sampling, the host read)."""
        self.steps_by_m[m] = self.steps_by_m.get(m, 0) + 1
        bucket = self._buckets[bucket_of(sum(item.num_tokens for item in scheduled))]
        bucket.measured[m] = _ema(bucket.measured.get(m), step_s)
        if m != 1:
            return
        hop, compute, n = (now - before for now, before in zip(self._hops(), self._hops_at))
        self.remote = n > 0
        layer = layer_times(self.clock.marks if self.clock is not None else [])
        if not self.remote or layer is None:
            return
        bucket.whole_steps += 1
        bucket.attn_s, bucket.send_s = _ema(bucket.attn_s, layer.busy_s), _ema(bucket.send_s, layer.send_s)
        bucket.wait_s = _ema(bucket.wait_s, layer.wait_s)
        bucket.compute_s = _ema(bucket.compute_s, compute / n)
        bucket.transport_s = _ema(bucket.transport_s, max(0.0, hop - compute) / n)


def micro_batching(value: int | str) -> FixedMicroBatches | AutoMicroBatches:
    check_micro_batches(value)
    return AutoMicroBatches() if value == AUTO else FixedMicroBatches(value)
