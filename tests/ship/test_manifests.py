"""The kustomize tree resolves, every manifest parses, and the install has what the docs promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def build(directory: Path) -> list[dict[str, Any]]:
    """Resolve a kustomization's resources (files and nested kustomizations) into documents."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory / 'kustomization.yaml'}: {entry} does not exist"
        if path.is_dir():
            documents += build(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def test_the_install_has_everything_once() -> None:
    documents = build(ROOT / "manifests") + build(ROOT / "manifests/monitoring")
    identities = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in documents]
    assert len(identities) == len(set(identities))
    assert {kind for kind, _, _ in identities} == {
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
    }
    assert {kind for kind, _, _ in [(d["kind"], 0, 0) for d in build(ROOT / "manifests/core")]} >= {
        "CustomResourceDefinition",
        "Deployment",
    }


def test_the_deployment_is_locked_down() -> None:
    deployment = next(d for d in build(ROOT / "manifests") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "limits" in container["resources"] and "requests" in container["resources"]
    assert pod["serviceAccountName"] == "matview-operator"


def test_the_default_install_needs_no_prometheus_operator() -> None:
    kinds = {d["kind"] for d in build(ROOT / "manifests")}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert {"CustomResourceDefinition", "Deployment", "ClusterRole"} <= kinds


def test_the_service_monitor_scrapes_the_metrics_port() -> None:
    documents = build(ROOT / "manifests") + build(ROOT / "manifests/monitoring")
    service = next(d for d in documents if d["kind"] == "Service")
    monitor = next(d for d in documents if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
