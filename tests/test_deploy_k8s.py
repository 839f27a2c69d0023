"""deploy/k8s: structural checks of the manifests (no kubeconform on PyPI here, no cluster).

Kinds and apiVersions, selectors matching labels, probe paths and ports, graceful shutdown
budget, non-root read-only pod, volumes, the ConfigMap's settings (validated by guard.settings),
and the PrometheusRule carrying exactly the rule files' groups.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
API_VERSIONS = {
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def m() -> dict[str, dict]:
    return manifests()


def subset(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container(m: dict) -> dict:
    (c,) = m["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_kinds_api_versions_and_kustomization(m) -> None:
    assert set(m) == set(API_VERSIONS)
    for kind, doc in m.items():
        assert doc["apiVersion"] == API_VERSIONS[kind], kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_selectors_match_labels(m) -> None:
    deployment = m["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert subset(m["Service"]["spec"]["selector"], pod_labels)
    assert subset(m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert subset(constraint["labelSelector"]["matchLabels"], pod_labels)
    monitor = m["ServiceMonitor"]
    assert subset(monitor["spec"]["selector"]["matchLabels"], m["Service"]["metadata"]["labels"])
    service_ports = {p["name"] for p in m["Service"]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    target = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])


def test_ports_and_probes(m) -> None:
    c = container(m)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    for port in m["Service"]["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports, probe
    # /readyz answers at once (the guard's own readiness); the probe's timeout leaves room for a loaded replica
    assert c["readinessProbe"]["timeoutSeconds"] > 5


def test_replicas_autoscaling_and_disruption_budget(m) -> None:
    spec = m["Deployment"]["spec"]
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert spec["replicas"] >= 2 and 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert m["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["minReplicas"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_graceful_shutdown_budget(m) -> None:
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = container(m)
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    config = yaml.safe_load(m["ConfigMap"]["data"]["config.yaml"])
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + config["shutdown_grace"]


def test_security_context_and_resources(m) -> None:
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = container(m)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile  # the image's user
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


def test_volumes_config_and_policy(m) -> None:
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = container(m)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    assert set(mounts.values()) == set(volumes)
    config = yaml.safe_load(m["ConfigMap"]["data"]["config.yaml"])
    # the datapoint log sits on an emptyDir (the root filesystem is read-only), and so does /tmp
    datapoints_dir = str(Path(config["datapoints"]).parent)
    assert "emptyDir" in volumes[mounts[datapoints_dir]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # the config file named in args comes from the ConfigMap
    args = c["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert volumes[mounts[str(config_path.parent)]]["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    assert config_path.name in m["ConfigMap"]["data"]
    # the policy comes from its own ConfigMap, optional until the first calibration
    policy = volumes[mounts["/etc/refusal-guard/policy"]]["configMap"]
    assert policy["name"] == "refusal-guard-policy" and policy["optional"] is True
    assert "# policy: /etc/refusal-guard/policy/policy.json" in m["ConfigMap"]["data"]["config.yaml"]


def test_configmap_settings_are_valid(m) -> None:
    from guard.settings import Settings

    config = yaml.safe_load(m["ConfigMap"]["data"]["config.yaml"])
    settings = Settings(**config)
    assert settings.port == 8080 and settings.host == "0.0.0.0"


def test_prometheus_rule_carries_the_rule_files(m) -> None:
    groups = [g for name in ("refusal_guard_recording.yml", "refusal_guard_alerts.yml")
              for g in yaml.safe_load((REPO / "deploy" / "prometheus" / "rules" / name).read_text())["groups"]]
    assert m["PrometheusRule"]["spec"]["groups"] == groups
