"""moemesh/wire/p2p_native.py: the C frame loop is built once and cached, and its absence is a clean fallback."""

from __future__ import annotations

import pytest

from moemesh.wire import p2p_native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEMESH_KERNEL_CACHE", str(tmp_path))
    p2p_native.reset()
    yield tmp_path
    p2p_native.reset()  # the next user builds (or finds) the real one again


def test_without_a_compiler_the_python_path_is_used_and_said_once(fresh, monkeypatch, capsys):
    monkeypatch.setattr(p2p_native, "find_compiler", lambda: None)
    assert p2p_native.load() is None and p2p_native.load() is None
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("p2p_native_unavailable") == 1


def test_switched_off_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("MOEMESH_P2P_NATIVE", "0")
    assert p2p_native.load() is None


def test_a_failed_build_falls_back(fresh, monkeypatch):
    monkeypatch.setattr(p2p_native, "FLAGS", ("-this-flag-does-not-exist",))
    if p2p_native.find_compiler() is None:
        pytest.skip("no C compiler here")
    assert p2p_native.load() is None


def test_built_once_into_the_cache_and_loaded_from_it(fresh):
    if p2p_native.find_compiler() is None:
        pytest.skip("no C compiler here")
    lib = p2p_native.load()
    assert lib is not None and lib.mm_p2p_abi() == p2p_native.ABI_VERSION
    (built,) = fresh.glob("p2p_native-*.so")
    p2p_native.reset()
    assert p2p_native.load() is not None and list(fresh.glob("p2p_native-*.so")) == [built]
