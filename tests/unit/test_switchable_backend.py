"""SwitchableBackend: installs take effect between steps; a failed step can wait for the next backend."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moemesh.attn_node.experts.replica_routes import ExpertsUnavailable
from moemesh.attn_node.experts.switchable_backend import SwitchableBackend
from tests.helpers import eventually


class Fake:
    def __init__(self, name):
        self.name, self.closed = name, False

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        return self.name

    def combine(self, handle):
        return torch.zeros(1)

    def close(self):
        self.closed = True


def _eventually_closed(backend):
    eventually(lambda: backend.closed, what=f"backend {backend.name} closed", interval_s=0.01)


def test_install_outside_a_step_is_immediate_and_closes_the_old_one():
    sb = SwitchableBackend()
    with pytest.raises(ExpertsUnavailable, match="no expert placement"):
        sb.dispatch(1, None, None, None)
    a, b = Fake("a"), Fake("b")
    assert sb.install(a) and sb.current is a
    assert sb.install(b) and sb.current is b
    _eventually_closed(a)


def test_install_during_a_step_waits_for_its_end():
    sb = SwitchableBackend()
    a, b = Fake("a"), Fake("b")
    sb.install(a)
    generation = sb.begin_step()
    done = threading.Event()
    threading.Thread(target=lambda: (sb.install(b), done.set()), daemon=True).start()
    assert not done.wait(0.2)
    assert sb.dispatch(1, None, None, None) == (a, "a")  # the step keeps its backend
    sb.end_step()
    assert done.wait(60) and sb.current is b and sb.generation == generation + 1
    _eventually_closed(a)


def test_wait_for_change_wakes_on_install_and_times_out_without():
    sb = SwitchableBackend()
    sb.install(Fake("a"))
    generation = sb.begin_step()
    sb.end_step()
    assert not sb.wait_for_change(generation, 0.05)
    b = Fake("b")
    threading.Timer(0.1, lambda: sb.install(b)).start()
    started = time.monotonic()
    assert sb.wait_for_change(generation, 10) and sb.current is b
    assert time.monotonic() - started < 9


def test_wait_for_change_fails_at_once_when_no_placement_can_come():
    """The outlook's verdict decides: unservable raises without waiting; degraded waits; a newer backend wins."""
    from moemesh.attn_node.experts.replica_routes import ExpertsUnservable
    from moemesh.control.servability import judge

    seen = []
    verdicts = {"unservable": judge({1: [4, 5]}, 1, 4, 8), "degraded": judge({1: [4, 5]}, 1, 8, 8)}
    state = {"now": "unservable"}
    sb = SwitchableBackend(outlook=lambda current: seen.append(current) or verdicts[state["now"]])
    a = Fake("a")
    sb.install(a)
    generation = sb.generation
    with pytest.raises(ExpertsUnservable, match="^the mesh cannot serve: no live expert node hosts layer 1: "
                                                "experts 4-5, and the 1 live") as e:
        sb.wait_for_change(generation, 30.0)
    assert seen == [a]  # raised, not timed out: waiting would have returned False after 30 s
    assert isinstance(e.value, ExpertsUnavailable)  # the engine's step catches it as a backend error
    state["now"] = "degraded"
    assert sb.wait_for_change(generation, 0.05) is False  # it waited (and timed out): a re-plan can come
    b = Fake("b")
    sb.install(b)
    state["now"] = "unservable"
    assert sb.wait_for_change(generation, 1.0) is True  # a newer backend is in place: no verdict asked
    assert seen == [a, a]
