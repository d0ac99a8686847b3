"""The kernel's floor for a hop (moemesh/wire/tcp_floor.py): a C ping-pong over loopback, run for real."""

from __future__ import annotations

import os

import pytest

from moemesh.native.build import find_compiler
from moemesh.wire import tcp_floor

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler: the floor is not measured")


@pytest.mark.parametrize("spin", [True, False])
@pytest.mark.parametrize("nbytes", [1, 600, 70_000])  # one byte; a decode hop; more than one segment
def test_a_ping_pong_round_trip_is_measured(nbytes, spin):
    us = tcp_floor.floor_us(nbytes, 50, spin=spin)
    assert us is not None and 0 < us < 5e6  # the C side bounds every wait at 5 s


def test_one_core_pins_both_ends_and_gives_the_caller_its_cpus_back():
    before = os.sched_getaffinity(0)
    assert tcp_floor.floor_us(600, 50, spin=False, one_core=True) > 0
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("nbytes, rounds", [(0, 10), (10, 0), (-1, 10)])
def test_nonsense_sizes_are_refused(nbytes, rounds):
    with pytest.raises(ValueError, match="must be >= 1"):
        tcp_floor.floor_us(nbytes, rounds, spin=True)


def test_the_c_side_refuses_what_python_would_not_send():
    lib = tcp_floor._lib()
    out = tcp_floor.ctypes.c_double()
    assert lib.mm_tcp_floor(0, 1, 1, 1, 0, tcp_floor.ctypes.byref(out)) < 0
    assert lib.mm_tcp_floor(10, -1, 1, 1, 0, tcp_floor.ctypes.byref(out)) < 0


def test_without_a_compiler_there_is_no_floor(monkeypatch):
    monkeypatch.setattr(tcp_floor, "find_compiler", lambda: None)
    monkeypatch.setattr(tcp_floor, "_state", {})
    assert tcp_floor.floor_us(600, 10, spin=True) is None


def test_a_floor_that_fails_leaves_the_bench_its_other_figures(monkeypatch):
    from moemesh.cli import bench_mesh

    def refuse(*args, **kwargs):
        raise OSError(110, "timed out")

    monkeypatch.setattr(tcp_floor, "floor_us", refuse)
    assert bench_mesh._floor(600, 10, spin=True) == float("inf")
    assert bench_mesh._measured(float("inf")) is None and bench_mesh._measured(2.0) == 2.0
