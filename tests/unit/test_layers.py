"""The layers of the code, enforced: the core never imports a role, ``cli/`` or ``launch/``; roles never
import each other; kernels import only the core. Every import counts, also those inside functions.

See docs/architecture.md for the layout these rules keep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("attn_node", "expert_node", "router")
TOP = ("cli", "launch")  # above the roles: they wire roles together
# The folders that install as moemesh.<name> (pyproject's package-dir), and the core rooms.
FOLDERS = {"moemesh": ROOT / "moemesh", **{name: ROOT / name for name in (*ROLES, "kernels")}}
MAX_FLAT_MODULES = 12

pytestmark = pytest.mark.unit


def _layer(module: str) -> str:
    """``moemesh.router.server`` -> ``router``; ``moemesh.control.etcd`` -> ``core``; ``moemesh.cli`` -> ``cli``."""
    parts = module.split(".")
    if parts[0] != "moemesh":
        return "outside"
    if len(parts) == 1:
        return "core"
    if parts[1] in (*ROLES, *TOP, "kernels"):
        return parts[1]
    return "core"


def _module_of(path: Path) -> str:
    for name, folder in FOLDERS.items():
        if folder in path.parents:
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join(["moemesh"] + ([] if name == "moemesh" else [name]) + parts)
    raise AssertionError(f"{path} is in no package folder")


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            if target == "moemesh":  # `from moemesh import router` imports the submodule
                out += [(node.lineno, f"moemesh.{alias.name}") for alias in node.names]
    return out


ALLOWED = {
    "core": {"core", "outside"},
    "kernels": {"core", "kernels", "outside"},
    **{role: {"core", "kernels", role, "outside"} for role in ROLES},
    "cli": {"core", "kernels", *ROLES, *TOP, "outside"},
    "launch": {"core", "kernels", *ROLES, "launch", "outside"},
}
# The package's front page re-exports the client SDK (router/client.py) lazily, for `from moemesh import
# MeshClient`: the one import of a role the core may make, and only from there.
EXEMPT = {("moemesh", "moemesh.router")}


def _product_files() -> list[Path]:
    files = []
    for folder in FOLDERS.values():
        files += [p for p in folder.rglob("*.py") if "v1" not in p.relative_to(folder).parts[:1]]
    return sorted(files)


def _violations(path: Path, module: str) -> list[str]:
    layer = _layer(module)
    return [f"{path.name}:{line}: {module} ({layer}) imports {target} ({_layer(target)})"
            for line, target in _imports(path, module)
            if (module, target) not in EXEMPT and _layer(target) not in ALLOWED[layer]]


def test_every_import_respects_the_layers():
    wrong = [v for path in _product_files() for v in _violations(path, _module_of(path))]
    assert not wrong, "imports across the layers (see docs/architecture.md):\n" + "\n".join(wrong)


def test_the_core_stays_in_rooms():
    flat = sorted(p.name for p in (ROOT / "moemesh").glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, f"{len(flat)} modules flat in moemesh/ (at most {MAX_FLAT_MODULES}): {flat}"


def test_the_checker_catches_imports_across_layers(tmp_path):
    # A check that cannot fail is no check: each forbidden kind, also inside a function and relative.
    f = tmp_path / "m.py"
    f.write_text("from moemesh.router.server import InferenceService\n"
                 "def later():\n    from ..expert_node import shard\n    import moemesh.launch.procs\n")
    assert len(_violations(f, "moemesh.attn_node.m")) == 3
    f.write_text("from moemesh import router\nfrom moemesh.cli import main\n")
    assert len(_violations(f, "moemesh.control.m")) == 2
    f.write_text("from moemesh.control.etcd import Registry\nfrom moemesh.kernels.ops import select_ops\n")
    assert _violations(f, "moemesh.router.m") == []
