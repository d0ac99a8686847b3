"""deploy/ renders offline, validates against the Kubernetes schemas, and runs real moemesh commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moemesh.cli.main import build_parser

from .manifests import (COMPONENTS, OVERLAYS, config_map, container_env, containers, docs, moemesh_argv,
                        pod_specs, render_component_on_base, render_overlay, require_tool)

pytestmark = pytest.mark.unit  # renders with kubectl (see tests/deploy/conftest.py: never skipped in CI)

K8S_VERSION = "1.32.0"
VALIDATE = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or shutil.which(
    "kubernetes-validate")
ROLE_COMMANDS = {"router": "router", "attn": "attn-node", "expert": "expert-node"}
PORT_VARS = {"router": "MOEMESH_ROUTER_PORT", "attn": "MOEMESH_ATTN_PORT", "expert": "MOEMESH_EXPERT_PORT"}
RENDERS = [("overlay", name) for name in OVERLAYS] + [("component", name) for name in COMPONENTS]


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], str]:
    return {key: render_overlay(key[1]) if key[0] == "overlay" else render_component_on_base(key[1])
            for key in RENDERS}


def test_every_overlay_and_component_exists():
    assert {"dev", "gpu"} <= set(OVERLAYS)
    assert {"ratio-1-2", "ratio-1-4", "expert-pool-b"} <= set(COMPONENTS)


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_renders_and_validates_strict(rendered, key):
    require_tool(VALIDATE, "kubernetes-validate", "pip install -e '.[test]'")
    out = subprocess.run([VALIDATE, "--strict", "--quiet", "-k", K8S_VERSION, "-"], input=rendered[key],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{key} does not validate:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_images_pinned(rendered, key):
    for obj, c, _ in containers(docs(rendered[key])):
        image = c["image"]
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest" and "@" not in tag, f"{obj['metadata']['name']}/{c['name']}: {image} not pinned"
        assert "/" in name, f"{image}: the image name was not set by kustomize"
    if key[0] == "overlay":  # one moemesh build per overlay
        tags = {c["image"] for _, c, _ in containers(docs(rendered[key])) if "moemesh/moemesh" in c["image"]}
        assert len(tags) == 1, f"{key}: moemesh images {tags}"


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_moemesh_commands_parse(rendered, key):
    """Every moemesh container's args are a real subcommand the CLI's own parser accepts."""
    objs = docs(rendered[key])
    seen = set()
    parser = build_parser()
    for obj, c, init in containers(objs):
        env = container_env(c, objs, {"POD_NAME": "pod-0", "POD_NAMESPACE": "ns", "POD_IP": "10.0.0.1"})
        argv = moemesh_argv(c, env)
        if argv is None or not c["image"].split("/")[-1].startswith("moemesh"):
            continue
        assert "$(" not in " ".join(argv), f"{c['name']}: unresolved variable in {argv}"
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{obj['metadata']['name']}/{c['name']}: the CLI rejects {argv}")
        seen.add(args.command)
        role = obj["spec"]["template"]["metadata"]["labels"].get("moemesh.io/role")
        if not init:
            assert args.command == ROLE_COMMANDS[role], f"{role} pod runs {args.command}"
    assert {"router", "attn-node", "expert-node"} <= seen


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_metrics_and_health_ports_listen_where_the_cluster_reaches_them(rendered, key):
    """--metrics-port and --health-port bind the node's --host: pods scraped or probed from outside pass
    --host 0.0.0.0 (the default, 127.0.0.1, would hide them from Prometheus and the kubelet)."""
    objs = docs(rendered[key])
    parser = build_parser()
    for obj, c, _ in containers(objs):
        env = container_env(c, objs, {"POD_NAME": "pod-0", "POD_NAMESPACE": "ns", "POD_IP": "10.0.0.1"})
        argv = moemesh_argv(c, env)
        if argv is None or not c["image"].split("/")[-1].startswith("moemesh"):
            continue
        args = parser.parse_args(argv)
        if getattr(args, "metrics_port", None) is not None or getattr(args, "health_port", None) is not None:
            assert args.host == "0.0.0.0", f"{obj['metadata']['name']}/{c['name']}: --host {args.host}"


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_pod_conventions(rendered, key):
    """Probes on the served port, matching metrics annotation, labels, security, resources, grace."""
    objs = docs(rendered[key])
    cm = config_map(objs)
    for obj, spec in pod_specs(objs):
        name = obj["metadata"]["name"]
        meta = obj["spec"]["template"]["metadata"]
        labels = meta["labels"]
        for label in ("name", "instance", "component", "part-of", "version"):
            assert f"app.kubernetes.io/{label}" in labels, f"{name}: no app.kubernetes.io/{label}"
        role = labels["moemesh.io/role"]
        ann = meta["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        if role in ROLE_COMMANDS:
            assert ann["prometheus.io/port"] == cm["MOEMESH_METRICS_PORT"]
            port = int(cm[PORT_VARS[role]])
            grace = spec["terminationGracePeriodSeconds"]
            assert grace >= {"router": 30, "attn": 120, "expert": 60}[role], f"{name}: grace {grace}"
        for _, c, init in containers([obj]):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"], f"{name}/{c['name']}: resources"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if init or role not in ROLE_COMMANDS:
                continue
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"
            health = int(cm["MOEMESH_HEALTH_PORT"])
            http = {int(cm["MOEMESH_HTTP_PORT"])} if role == "router" else set()  # the OpenAI HTTP API
            assert {p["containerPort"] for p in c["ports"]} == {port, int(cm["MOEMESH_METRICS_PORT"]), health} | http
            if http:
                assert "--http-port=$(MOEMESH_HTTP_PORT)" in c["args"], f"{name}: no HTTP API"
            assert "--health-port=$(MOEMESH_HEALTH_PORT)" in c["args"], f"{name}: no plaintext health port"
            probes = [c["readinessProbe"], c["livenessProbe"]] + ([c["startupProbe"]] if "startupProbe" in c else [])
            tls = any(a.startswith("--tls-cert") for a in c["args"])
            for probe in probes:
                # Native kubelet gRPC probes speak no TLS: they check the plaintext health-only port.
                assert probe["grpc"]["port"] == health and "exec" not in probe, f"{name}: probe {probe}"
            if tls:
                assert "/etc/moemesh/tls" in mounts
                secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
                # One Secret per role: the role is in the certificate (docs/security.md), so roles never share one.
                assert secrets == [f"moemesh-tls-{role}", "moemesh-etcd-client"], f"{name}: {secrets}"


def test_base_shape(rendered):
    """etcd has 3 members with claims; router >= 2; HPAs on both pools; PDB per role; policies."""
    objs = docs(rendered[("component", "ratio-1-2")])
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    etcd = by[("StatefulSet", "moemesh-etcd")]
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["volumeClaimTemplates"]
    args = " ".join(etcd["spec"]["template"]["spec"]["containers"][0]["args"])
    assert all(f"moemesh-etcd-{i}=https://moemesh-etcd-{i}.moemesh-etcd." in args for i in range(3))
    image = etcd["spec"]["template"]["spec"]["containers"][0]["image"]
    major, minor, patch = (int(x) for x in image.rsplit(":v", 1)[1].split("."))
    assert image.startswith("quay.io/coreos/etcd:") and (major, minor) == (3, 5) and patch >= 6
    assert by[("Deployment", "moemesh-router")]["spec"]["replicas"] >= 2
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    assert {"moemesh-expert", "moemesh-attn"} <= targets
    pdb_roles = {o["spec"]["selector"]["matchLabels"]["moemesh.io/role"] for o in objs
                 if o["kind"] == "PodDisruptionBudget"}
    assert pdb_roles == {"etcd", "router", "attn", "expert"}
    assert sum(o["kind"] == "NetworkPolicy" for o in objs) >= 3


def test_ratios(rendered):
    for r in (2, 4):
        by = {(o["kind"], o["metadata"]["name"]): o for o in docs(rendered[("component", f"ratio-1-{r}")])}
        attn = by[("StatefulSet", "moemesh-attn")]["spec"]["replicas"]
        assert by[("StatefulSet", "moemesh-expert")]["spec"]["replicas"] == r * attn


def test_expert_pool_b_joins_the_same_mesh(rendered):
    objs = docs(rendered[("component", "expert-pool-b")])
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    a, b = by[("StatefulSet", "moemesh-expert")], by[("StatefulSet", "moemesh-expert-b")]
    assert a["spec"]["selector"]["matchLabels"] != b["spec"]["selector"]["matchLabels"]
    spec_b = b["spec"]["template"]["spec"]
    assert spec_b["nodeSelector"] and spec_b["tolerations"]
    env = {"POD_NAME": "p", "POD_NAMESPACE": "n"}
    argv_a = moemesh_argv(a["spec"]["template"]["spec"]["containers"][0], container_env(
        a["spec"]["template"]["spec"]["containers"][0], objs, env))
    argv_b = moemesh_argv(spec_b["containers"][0], container_env(spec_b["containers"][0], objs, env))
    pick = lambda argv, flag: [x for x in argv if x.startswith(flag)]  # noqa: E731
    for flag in ("--cluster=", "--etcd=", "--model="):
        assert pick(argv_a, flag) == pick(argv_b, flag)


def test_gpu_overlay(rendered):
    objs = docs(rendered[("overlay", "gpu")])
    for obj, c, init in containers(objs):
        role = obj["spec"]["template"]["metadata"]["labels"]["moemesh.io/role"]
        if role in ("attn", "expert") and not init:
            assert c["resources"]["limits"]["nvidia.com/gpu"]
            assert c["image"].endswith("-cu128")
        if role == "attn":
            assert "--kernels=triton" in c["args"]
        if role in ("attn", "expert") and not init:
            assert "--transport=torch" in c["args"], f"{role}: the gpu overlay moves rows over NCCL"
    policies = {o["metadata"]["name"] for o in objs if o["kind"] == "NetworkPolicy"}
    assert "moemesh-torch-transport" in policies


def test_gpu_overlay_computes_on_the_gpu(rendered):
    """Attention and expert containers run --device=cuda and each requests (and is limited to) a GPU."""
    objs = docs(rendered[("overlay", "gpu")])
    parser = build_parser()
    seen = set()
    for obj, c, init in containers(objs):
        role = obj["spec"]["template"]["metadata"]["labels"]["moemesh.io/role"]
        if role not in ("attn", "expert") or init:
            continue
        seen.add(role)
        env = container_env(c, objs, {"POD_NAME": "pod-0", "POD_NAMESPACE": "ns", "POD_IP": "10.0.0.1"})
        args = parser.parse_args(moemesh_argv(c, env))
        assert args.device == "cuda", f"{role}: --device {args.device}, expected cuda"
        assert args.dtype == "bfloat16" and args.fp8 in ("auto", "keep"), f"{role}: {args.dtype}, --fp8 {args.fp8}"
        resources = c["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) >= 1, f"{role}: no GPU requested"
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        if role == "attn":
            assert args.kernels in ("triton", "auto"), f"attn: --kernels {args.kernels}"
    assert seen == {"attn", "expert"}
    # The CPU overlay leaves the device to auto (CPU there): no pod of dev asks for a GPU.
    dev = docs(rendered[("overlay", "dev")])
    for obj, c, _ in containers(dev):
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), obj["metadata"]["name"]


def _etcd(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "moemesh-etcd")


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in args)


@pytest.mark.parametrize("key", [k for k in RENDERS if k != ("overlay", "dev")], ids=lambda k: f"{k[0]}-{k[1]}")
def test_etcd_is_tls_with_client_certificates(rendered, key):
    """Clients and peers speak TLS only; etcd requires client certificates of its CA; probes use the plaintext
    metrics port (/health, /metrics: no keys); the certificates come from the Secret moemesh-etcd-tls."""
    objs = docs(rendered[key])
    etcd = _etcd(objs)
    spec = etcd["spec"]["template"]["spec"]
    c = spec["containers"][0]
    f = _flags(c["args"])
    assert f["--listen-client-urls"].startswith("https://") and f["--advertise-client-urls"].startswith("https://")
    assert f["--listen-peer-urls"].startswith("https://") and "http://" not in f["--initial-cluster"]
    assert "--client-cert-auth" in f and "--peer-client-cert-auth" in f
    for flag in ("--cert-file", "--key-file", "--trusted-ca-file", "--peer-cert-file", "--peer-key-file",
                 "--peer-trusted-ca-file"):
        assert f[flag].startswith("/etc/etcd/tls/"), flag
    assert f["--listen-metrics-urls"] == "http://0.0.0.0:2381"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["port"] == 2381 and probe["httpGet"].get("scheme", "HTTP") == "HTTP"
    assert etcd["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "2381"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["etcd-tls"]["mountPath"] == "/etc/etcd/tls" and mounts["etcd-tls"]["readOnly"] is True
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}["etcd-tls"] == "moemesh-etcd-tls"


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_every_etcd_client_dials_as_etcd_serves(rendered, key):
    """A TLS etcd: every moemesh container with --etcd gives --etcd-ca/--etcd-cert/--etcd-key from the mounted
    Secret moemesh-etcd-client; a plaintext etcd (dev): none does."""
    objs = docs(rendered[key])
    cm = config_map(objs)
    etcd_tls = _flags(_etcd(objs)["spec"]["template"]["spec"]["containers"][0]["args"])[
        "--listen-client-urls"].startswith("https://")
    seen = 0
    for obj, c, _ in containers(objs):
        f = _flags(c.get("args") or [])
        if "--etcd" not in f:
            continue
        seen += 1
        name = f"{obj['metadata']['name']}/{c['name']}"
        given = {flag for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key") if flag in f}
        if not etcd_tls:
            assert not given, f"{name}: etcd flags {given} for a plaintext etcd"
            continue
        assert given == {"--etcd-ca", "--etcd-cert", "--etcd-key"}, f"{name}: {given}"
        assert all(f[flag].startswith("$(MOEMESH_ETCD_TLS_DIR)/") for flag in given), name
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        mount = mounts[cm["MOEMESH_ETCD_TLS_DIR"]]
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        assert mount["readOnly"] is True and volumes[mount["name"]]["secret"]["secretName"] == "moemesh-etcd-client"
    assert seen >= 3


@pytest.mark.parametrize("key", RENDERS, ids=[f"{k}-{n}" for k, n in RENDERS])
def test_only_mesh_roles_reach_the_etcd_client_port(rendered, key):
    """The NetworkPolicy on etcd: port 2379 from router/attention/expert pods only (no namespace selector, no
    other moemesh pod); 2380 from etcd members; monitoring gets the metrics port 2381 only."""
    objs = docs(rendered[key])
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "moemesh-etcd-ingress")
    assert policy["spec"]["podSelector"]["matchLabels"]["moemesh.io/role"] == "etcd"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {2379, 2380, 2381}
    (client,) = by_port[2379]
    assert set(client) == {"podSelector"}, "the client port admits pods of this namespace only"
    exprs = {e["key"]: set(e["values"]) for e in client["podSelector"]["matchExpressions"]}
    assert exprs == {"app.kubernetes.io/part-of": {"moemesh"}, "moemesh.io/role": {"router", "attn", "expert"}}
    assert all(peer["podSelector"]["matchLabels"]["moemesh.io/role"] == "etcd" for peer in by_port[2380])
    assert all(set(m) == {"namespaceSelector"} for m in by_port[2381])


EXPERTS_BY_MODEL = {"/models/tiny": 16, "/models/current": 256, "/models/deepseek-v3": 256}  # DeepSeek-V3: 256


def test_expert_slots_survive_one_pod_loss(rendered):
    """Every expert pod's --slots is default_expert_slots for the replicas its StatefulSet declares, and still
    survives one pod's loss at the fewest pods the HPAs allow (every expert pool at its minReplicas)."""
    from moemesh.control.placement import default_expert_slots, loss_survivable

    parser = build_parser()
    for key in RENDERS:
        objs = docs(rendered[key])
        env_pod = {"POD_NAME": "pod-0", "POD_NAMESPACE": "ns", "POD_IP": "10.0.0.1"}
        hpa_min = {o["spec"]["scaleTargetRef"]["name"]: o["spec"]["minReplicas"]
                   for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
        pools = {}
        for obj, c, init in containers(objs, init=False):
            if obj["spec"]["template"]["metadata"]["labels"]["moemesh.io/role"] != "expert":
                continue
            args = parser.parse_args(moemesh_argv(c, container_env(c, objs, env_pod)))
            assert args.slots is not None, f"{key}: {obj['metadata']['name']} gives no --slots (its memory budget)"
            pools[obj["metadata"]["name"]] = (obj["spec"]["replicas"], args.slots, EXPERTS_BY_MODEL[args.model])
        replicas, slots, experts = pools["moemesh-expert"]
        assert slots == default_expert_slots(experts, replicas), (key, pools)
        fewest = sum(min(n, hpa_min.get(name, n)) for name, (n, _, _) in pools.items())
        assert all(s == slots for _, s, _ in pools.values()), (key, pools)
        assert loss_survivable(experts, fewest, slots), f"{key}: {slots} slots on {fewest} pods do not survive a loss"
