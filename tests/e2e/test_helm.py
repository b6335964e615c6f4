"""The Helm chart (charts/matview-operator), with helm built from Go modules beside the control plane (#12).

helm lint; helm template for several values sets, each checked for what it must and must not render;
the rendered objects pass a server-side dry-run on the real kube-apiserver; and the chart's RBAC is the
kustomize install's, rule for rule.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ROOT, ControlPlane, _binaries
from tests.e2e.test_e2e import dry_run, namespace

CHART = ROOT / "charts/matview-operator"
#: Kinds of the prometheus-operator, whose CRDs the test control plane does not have.
MONITORING = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def helm() -> Path:
    return _binaries() / "helm"


def render(helm: Path, *values: str) -> list[dict[str, Any]]:
    arguments = [a for value in values for a in ("--set", value)]
    done = subprocess.run(
        [str(helm), "template", "mv", str(CHART), "--namespace", "matview-system", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in documents)


def rules(documents: list[dict[str, Any]]) -> list[Any]:
    return sorted(
        yaml.safe_dump(r, sort_keys=True) for d in documents if d["kind"] == "ClusterRole" for r in d["rules"]
    )


def test_helm_lint(helm: Path) -> None:
    done = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_default_install_matches_the_kustomize_one(helm: Path) -> None:
    documents = render(helm)
    assert kinds(documents) == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "Deployment",
        ]
    )
    crd = next(d for d in documents if d["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}  # kept on uninstall
    source = yaml.safe_load((ROOT / "crds/matview.dev_materializedviews.yaml").read_text())
    assert crd["spec"] == source["spec"], "the chart installs crds/ itself, not a copy"
    kustomize = [d for d in yaml.safe_load_all((ROOT / "manifests/core/rbac.yaml").read_text()) if d]
    assert rules(documents) == rules(kustomize), "the same RBAC as the kustomize install, rule for rule"
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" in container["args"]
    assert container["image"] == "ghcr.io/matview-dev/matview-operator:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not [d for d in documents if d["kind"] == "RoleBinding"], "Secrets are bound nowhere by default"


def test_memory_is_sized_for_the_views_per_replica_as_the_docs_say(helm: Path) -> None:
    """sizing.views sets the memory request and limit from the measured per-view cost; docs/operations.md's
    table is what the chart renders, row for row. Without it the resources stay as written."""
    import re

    def resources(*values: str) -> dict[str, Any]:
        deployment = next(d for d in render(helm, *values) if d["kind"] == "Deployment")
        found: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        return found

    assert resources() == {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    table = re.findall(r"^\| ([\d,]+) \| (\d+Mi) \| (\d+Mi) \|$", (ROOT / "docs/operations.md").read_text(), re.M)
    assert len(table) >= 3, "docs/operations.md has no sizing table"
    for views, request, limit in table:
        sized = resources(f"sizing.views={views.replace(',', '')}")
        assert sized == {"requests": {"cpu": "50m", "memory": request}, "limits": {"memory": limit}}, views


def test_watched_namespaces_get_role_bindings_and_secrets_access(helm: Path) -> None:
    documents = render(helm, "watchNamespaces={team-a,team-b}")
    bindings = sorted(
        (d["metadata"]["namespace"], d["roleRef"]["name"]) for d in documents if d["kind"] == "RoleBinding"
    )
    assert bindings == [
        ("team-a", "mv-matview-operator"),
        ("team-a", "mv-matview-operator-secrets"),
        ("team-b", "mv-matview-operator"),
        ("team-b", "mv-matview-operator-secrets"),
    ]
    assert "ClusterRoleBinding" not in kinds(documents)
    args = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:5] == ["operator", "--namespace", "team-a", "--namespace", "team-b"]


def test_switches_for_rbac_service_account_crds_and_placement(helm: Path) -> None:
    documents = render(
        helm,
        "rbac.create=false",
        "serviceAccount.create=false",
        "serviceAccount.name=existing",
        "crds.create=false",
        "metrics.service.enabled=false",
        "nodeSelector.disk=ssd",
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
        "extraEnv[0].name=TZ",
        "extraEnv[0].value=UTC",
        "image.tag=1.2.3",
    )
    assert kinds(documents) == ["Deployment"]
    pod = documents[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert pod["nodeSelector"] == {"disk": "ssd"} and pod["tolerations"][0]["key"] == "dedicated"
    assert {"name": "TZ", "value": "UTC"} in pod["containers"][0]["env"]
    assert pod["containers"][0]["image"].endswith(":1.2.3")


def test_monitoring_renders_the_tested_alert_rules(helm: Path) -> None:
    documents = render(helm, "metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true")
    assert set(kinds(documents)) >= MONITORING
    rule = next(d for d in documents if d["kind"] == "PrometheusRule")
    source = yaml.safe_load((ROOT / "manifests/monitoring/prometheusrule.yaml").read_text())
    assert rule["spec"] == source["spec"], "the alerts promtool tests, not a copy"
    monitor = next(d for d in documents if d["kind"] == "ServiceMonitor")
    service = next(d for d in documents if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_shards_render_a_statefulset_whose_pods_take_their_index(helm: Path) -> None:
    """shards > 1: one pod per shard, each told the count and its index (the pod-index label, through the
    downward API into the arguments), the memory sized per pod; the same pod as the Deployment otherwise."""
    plain = next(d for d in render(helm) if d["kind"] == "Deployment")
    documents = render(helm, "shards=4", "sizing.views=2500")
    assert "Deployment" not in kinds(documents)
    workload = next(d for d in documents if d["kind"] == "StatefulSet")
    assert workload["spec"]["replicas"] == 4 and workload["spec"]["podManagementPolicy"] == "Parallel"
    service = next(d for d in documents if d["kind"] == "Service")
    assert workload["spec"]["serviceName"] == service["metadata"]["name"]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-4:] == ["--shard-count", "4", "--shard-index", "$(MATVIEW_SHARD_INDEX)"]
    index = next(e for e in container["env"] if e["name"] == "MATVIEW_SHARD_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert container["resources"]["limits"]["memory"] == "448Mi"  # 2,500 views per pod
    expected = plain["spec"]["template"]["spec"]["containers"][0]
    same = {k: v for k, v in container.items() if k not in ("args", "env", "resources")}
    assert same == {k: v for k, v in expected.items() if k not in ("args", "env", "resources")}
    assert container["args"][:-4] == expected["args"] and container["env"][:-1] == expected["env"]
    refused = subprocess.run(
        [str(helm), "template", "mv", str(CHART), "--set", "shards=4", "--set", "replicaCount=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "shards and replicaCount" in refused.stderr, refused.stderr


@pytest.mark.parametrize("values", [(), ("watchNamespaces={helm-a,helm-b}",), ("shards=3",)])
def test_rendered_objects_pass_server_side_dry_run(
    control_plane: ControlPlane, helm: Path, values: tuple[str, ...]
) -> None:
    for name in ("helm-a", "helm-b"):
        status, _ = control_plane.request("GET", f"/api/v1/namespaces/{name}")
        if status == 404:
            namespace(control_plane, name)
    for document in render(helm, *values):
        if document["kind"] not in MONITORING:
            dry_run(control_plane, document, f"{document['kind']}/{document['metadata']['name']}")
