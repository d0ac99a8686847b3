"""The project's pages link only inside the repository, and every link resolves (a fresh clone has no ../shared/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md",
         ROOT / "kernels" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")

pytestmark = pytest.mark.unit


def _broken(text: str, where: Path, name: str) -> list[str]:
    """Links in ``text`` (a page in folder ``where``) that leave the repository or point at nothing."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (where / target.split("#")[0]).resolve()
        if ROOT not in path.parents and path != ROOT:
            out.append(f"{name}: {target} points outside the repository")
        elif not path.exists():
            out.append(f"{name}: {target} does not exist")
    return out


def test_architecture_pages_exist():
    assert (ROOT / "docs" / "architecture.md").is_file() and (ROOT / "docs" / "decode-step.md").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "docs/architecture.md" in readme and "docs/decode-step.md" in readme


def test_links_stay_inside_the_repository_and_resolve():
    broken = [b for page in PAGES for b in _broken(page.read_text(), page.parent, str(page.relative_to(ROOT)))]
    assert not broken, "\n".join(broken)


def test_the_link_check_catches_outside_and_missing_links():
    text = "[x](../shared/DESIGN.md) [y](docs/architecture.md) [z](docs/missing.md) [w](https://example.org)"
    assert len(_broken(text, ROOT, "README.md")) == 2
