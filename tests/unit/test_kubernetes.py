"""deploy/kubernetes: the manifests validate offline against Kubernetes' schemas
(kubernetes-validate, pinned in the test extra), fit together, and the ConfigMap's policy is a
valid nfhooks policy, also loaded through a real ConfigMap-style mount (``..data`` symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfhooks.loader import load_policy
from nfhooks.policy import PolicyError

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # pinned in the test extra
yaml = pytest.importorskip("yaml")  # PyYAML, a dependency of kubernetes-validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


def _kustomization() -> dict:
    return _load("kustomization.yaml")


def _by_kind() -> dict[str, dict]:
    return {d["kind"]: d for d in (_load(r) for r in _kustomization()["resources"])}


def _container() -> dict:
    (c,) = _by_kind()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


def _policy_text() -> str:
    return _by_kind()["ConfigMap"]["data"]["policy.py"]


# ----------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", ["namespace.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml"])
def test_manifest_validates_strictly(name):
    kubernetes_validate.validate(_load(name), K8S_VERSION, strict=True)


def test_kustomization_lists_every_core_manifest_but_not_the_servicemonitor():
    k = _kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    for r in k["resources"]:
        assert (K8S / r).is_file(), r
    assert set(k["resources"]) == {"namespace.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml"}
    assert "servicemonitor.yaml" not in k["resources"]  # needs the Prometheus Operator's CRD
    assert {d["metadata"].get("namespace", k["namespace"]) for d in _by_kind().values()
            if d["kind"] != "Namespace"} == {k["namespace"]}


def test_servicemonitor_is_well_formed_and_selects_the_metrics_service():
    # No schema for the operator's CRD in kubernetes-validate: checked structurally.
    sm = _load("servicemonitor.yaml")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(sm, K8S_VERSION, strict=True)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    svc = _by_kind()["Service"]
    labels = sm["spec"]["selector"]["matchLabels"]
    assert labels.items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    # the Service's selector picks the DaemonSet's pods
    ds = _by_kind()["DaemonSet"]
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


# ----------------------------------------------------------------- the DaemonSet


def test_daemonset_runs_in_the_node_namespace_with_only_the_capabilities_it_needs():
    ds = _by_kind()["DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["terminationGracePeriodSeconds"] >= 10  # time to remove its rules on SIGTERM
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    sc = _container()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    res = _container()["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys()


def test_daemonset_mounts_the_policy_configmap_read_only():
    spec = _by_kind()["DaemonSet"]["spec"]["template"]["spec"]
    c = _container()
    (vol,) = [v for v in spec["volumes"] if "configMap" in v]
    assert vol["configMap"]["name"] == _by_kind()["ConfigMap"]["metadata"]["name"]
    assert vol["configMap"]["defaultMode"] & 0o022 == 0  # the loader refuses writable policies
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    assert c["args"][:2] == ["run", mount["mountPath"] + "/policy.py"]
    # kube-proxy and CNI plugins take the node's xtables lock: nfhooks must share it
    assert {"/run/xtables.lock", "/run/nfhooks"} <= {m["mountPath"] for m in c["volumeMounts"]}


def test_daemonset_metrics_on_the_node_ip_probes_and_scrape_annotations():
    c = _container()
    args = c["args"]
    addr = args[args.index("--metrics-addr") + 1]
    assert addr == "$(NODE_IP):9477" and "--public-metrics" in args
    (env,) = [e for e in c["env"] if e["name"] == "NODE_IP"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9477}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    ann = _by_kind()["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9477", "prometheus.io/path": "/metrics"}


# ----------------------------------------------------------------- the policy


def test_configmap_policy_is_a_valid_nfhooks_policy(tmp_path):
    f = tmp_path / "policy.py"
    f.write_text(_policy_text())
    pol = load_policy(f)
    assert [h.name for h in pol.handlers] == ["legacy_remote_shells", "ssh"]
    assert {h.hook for h in pol.handlers} == {"INPUT"}
    load_policy(f, {"ssh_port": "2222"})


def _configmap_mount(base: Path, text: str, mode: int) -> Path:
    """The layout kubelet writes for a ConfigMap volume: a sticky, world-writable directory with
    the real files in a timestamped directory, ``..data`` pointing at it, and per-key symlinks."""
    mnt = base / "etc-nfhooks"
    data = mnt / "..2026_11_25_10_00_00.000000001"
    data.mkdir(parents=True)
    (data / "policy.py").write_text(text)
    (data / "policy.py").chmod(mode)
    (mnt / "..data").symlink_to(data.name)
    (mnt / "policy.py").symlink_to("..data/policy.py")
    mnt.chmod(0o1777)
    return mnt / "policy.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="a ConfigMap mount is root-owned: building one needs root")
def test_configmap_policy_loads_through_a_configmap_style_mount(tmp_path):
    path = _configmap_mount(tmp_path, _policy_text(), 0o444)  # defaultMode 0444, owned by root
    assert path.resolve().stat().st_uid == 0 and path.is_symlink()
    assert [h.name for h in load_policy(path).handlers] == ["legacy_remote_shells", "ssh"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a ConfigMap mount is root-owned: building one needs root")
def test_a_world_writable_configmap_mode_is_refused(tmp_path):
    path = _configmap_mount(tmp_path, _policy_text(), 0o666)  # defaultMode 0666: anyone could edit
    with pytest.raises(PolicyError, match="writable by other users"):
        load_policy(path)
