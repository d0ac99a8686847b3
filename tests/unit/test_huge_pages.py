"""moemesh processes ask PyTorch for 2 MB pages (moemesh/cli/huge_pages.py), before torch loads."""

import os
import subprocess
import sys

from moemesh.cli.huge_pages import ENV, ask_for_huge_pages


def test_switch_set_before_torch_loads():
    env: dict[str, str] = {}
    assert ask_for_huge_pages(env, loaded=frozenset({"os"})) is True
    assert env == {ENV: "1"}


def test_operator_opt_out_kept():
    env = {ENV: "0"}
    assert ask_for_huge_pages(env, loaded=frozenset()) is False
    assert env == {ENV: "0"}


def test_too_late_once_torch_is_loaded():
    env: dict[str, str] = {}
    assert ask_for_huge_pages(env, loaded=frozenset({"torch"})) is False
    assert env == {}


def test_cli_import_sets_it_before_torch():
    """The CLI package sets the switch ahead of its own torch import (a reorder would leave it unset)."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    code = "import sys, os, moemesh.cli; print('torch' in sys.modules, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "1"]
