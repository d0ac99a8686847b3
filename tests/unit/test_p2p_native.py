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
    lib = p2p_native.load_ctypes()
    assert lib is not None and lib.mm_p2p_abi() == p2p_native.ABI_VERSION
    (built,) = fresh.glob("p2p_native-*.so")
    p2p_native.reset()
    assert p2p_native.load_ctypes() is not None and list(fresh.glob("p2p_native-*.so")) == [built]


def test_the_extension_is_built_keyed_on_the_python_too_and_serves_the_same_calls(fresh, monkeypatch):
    if p2p_native.find_compiler() is None:
        pytest.skip("no C compiler here")
    mod = p2p_native.load()
    if not (mod is not None and hasattr(mod, "__file__")):
        pytest.skip("the CPython extension cannot be built here (no Python.h)")
    assert mod.mm_p2p_abi() == p2p_native.ABI_VERSION
    (built,) = fresh.glob(f"{p2p_native.EXT_NAME}-*.so")
    assert not list(fresh.glob("p2p_native-*.so"))  # the ctypes library is only built when the extension fails
    lib = p2p_native.load_ctypes()
    for name in ("mm_recv", "mm_serve", "mm_send", "mm_reply", "mm_rows_with_work", "mm_check_rows", "mm_recv_large"):
        assert hasattr(mod, name) and hasattr(lib, name)
    p2p_native.reset()
    monkeypatch.setattr(p2p_native, "python_key", lambda: ("another Python",))
    assert p2p_native.load() is not None
    assert len(list(fresh.glob(f"{p2p_native.EXT_NAME}-*.so"))) == 2  # another interpreter builds its own
    assert built.exists()


def test_the_extension_checks_its_arguments_and_takes_none_for_null(fresh):
    mod = p2p_native.load()
    if not (mod is not None and hasattr(mod, "__file__")):
        pytest.skip("the CPython extension cannot be built here")
    with pytest.raises(TypeError, match="takes 4 arguments"):
        mod.mm_rows_with_work(0, 8, 0)
    with pytest.raises(TypeError):
        mod.mm_recv("not an address")
    assert mod.mm_rows_with_work(None, 8, 0, 2) == 0  # no rows: nothing read
    assert mod.mm_check_rows(None, None, 0, None, 0) == 0


@pytest.mark.parametrize("why", ["env", "no_headers"])
def test_without_the_extension_the_ctypes_library_serves_and_says_so_once(fresh, monkeypatch, capsys, tmp_path, why):
    if p2p_native.find_compiler() is None:
        pytest.skip("no C compiler here")
    if why == "env":
        monkeypatch.setenv("MOEMESH_P2P_EXT", "0")
    else:
        monkeypatch.setattr(p2p_native, "python_include", lambda: str(tmp_path / "no-headers"))
    lib = p2p_native.load()
    assert lib is p2p_native.load() and not hasattr(lib, "__file__") and lib.mm_p2p_abi() == p2p_native.ABI_VERSION
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("p2p_ext_") == 1
