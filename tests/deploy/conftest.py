"""tests/deploy needs kubectl: skipped without it locally, a clear failure when CI is set (never a silent skip)."""

from __future__ import annotations

import pytest

from .manifests import require_kubectl


@pytest.fixture(scope="session", autouse=True)
def _kubectl():
    require_kubectl()
