"""Render the kustomize trees under deploy/ and pick containers out of them (for tests/deploy)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL = shutil.which("kubectl")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def require_tool(found: str | None, what: str, install: str) -> None:
    """Skip without ``what`` locally; fail when the ``CI`` environment variable is set, so CI never
    reports a green run that silently skipped deploy/."""
    if found is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {what} is not installed, so tests/deploy cannot run: {install} "
                    "(they skip without it only outside CI)", pytrace=False)
    pytest.skip(f"{what} is not installed: {install}")


def require_kubectl() -> None:
    require_tool(KUBECTL, "kubectl", "put kubectl on PATH (deploy/ is rendered with `kubectl kustomize`)")


def kustomize(path: Path) -> str:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return out.stdout


def render_overlay(name: str) -> str:
    return kustomize(DEPLOY / "overlays" / name)


def render_component_on_base(component: str) -> str:
    """Base plus one component, through a throwaway kustomization next to nothing in the repo."""
    with tempfile.TemporaryDirectory(prefix="moemesh-kustomize-") as tmp:
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{os.path.relpath(DEPLOY / 'base', tmp)}]\n"
            f"components: [{os.path.relpath(DEPLOY / 'components' / component, tmp)}]\n")
        return kustomize(Path(tmp))


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_specs(objs: list[dict]):
    """(object, pod spec) for every workload."""
    for obj in objs:
        if obj.get("kind") in WORKLOADS:
            yield obj, obj["spec"]["template"]["spec"]


def containers(objs: list[dict], init: bool = True):
    """(object, container, is_init) for every container of every workload."""
    for obj, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) if init else []:
            yield obj, c, True
        for c in spec["containers"]:
            yield obj, c, False


def config_map(objs: list[dict]) -> dict[str, str]:
    found = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("moemesh-config")]
    assert len(found) == 1, "exactly one moemesh-config ConfigMap"
    return dict(found[0]["data"])


def container_env(container: dict, objs: list[dict], overrides: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom first, then env), with
    downward-API fields taken from ``overrides`` (POD_NAME, POD_NAMESPACE, POD_IP)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        assert "configMapRef" in src, f"unexpected envFrom {src}"
        env.update(config_map(objs))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            env[item["name"]] = overrides.get(item["name"], f"dummy-{item['name'].lower()}")
    env.update({k: v for k, v in overrides.items() if k in env})
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (unknown variables stay as written, as the kubelet leaves them)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def moemesh_argv(container: dict, env: dict[str, str]) -> list[str] | None:
    """The moemesh CLI argv of a container running the moemesh image's entrypoint, else None."""
    if container.get("command"):
        return None
    return [expand(a, env) for a in container.get("args", [])]
