"""End to end against a real kube-apiserver + etcd: the CRD, its validation, RBAC, and the operator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.embedded.localpg import free_port
from tests.e2e.conftest import ROOT, ControlPlane, operator_token

MV_PATH = "/apis/matview.dev/v1alpha1/namespaces/{ns}/materializedviews"
QUERY = "SELECT region, sum(amount) AS total FROM public.sales GROUP BY region"


def mv(resource: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": QUERY,
        "indexes": [{"columns": ["region"], "unique": True}],
        "database": {"secretRef": {"name": "db"}},
    }
    body.update(spec)
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": resource, "namespace": namespace},
        "spec": body,
    }


def namespace(plane: ControlPlane, name: str) -> str:
    plane.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def wait_for(check: Callable[[], Any], what: str, seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"gave up waiting for {what}")


def condition(plane: ControlPlane, ns: str, name: str, type_: str) -> dict[str, Any] | None:
    status, body = plane.request("GET", MV_PATH.format(ns=ns) + f"/{name}")
    if status != 200:
        return None
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


@pytest.mark.parametrize(
    ("case", "change", "expected"),
    [
        ("unknown field", {"refesh": {"interval": "1h"}}, 'unknown field "spec.refesh"'),
        ("bad enum", {"refresh": {"mode": "Sometimes"}}, "Unsupported value"),
        ("interval and schedule", {"refresh": {"interval": "1h", "schedule": "0 * * * *"}}, "not both"),
        (
            "Concurrent without unique index",
            {"refresh": {"mode": "Concurrent"}, "indexes": [{"columns": ["region"]}]},
            "Concurrent needs a unique index",
        ),
        ("bad duration", {"refresh": {"interval": "soon"}}, "should match"),
        ("timeout past PostgreSQL's limit", {"refresh": {"timeout": "600h"}}, "between 1s and 596h"),
        ("interval past the scheduler's range", {"refresh": {"interval": "99999999999h"}}, "spec.refresh"),
        ("lockTimeout too short", {"refresh": {"lockTimeout": "1ms"}}, "between 10ms and 596h"),
        ("Secret name with a path", {"database": {"secretRef": {"name": "../kube-system/x"}}}, "should match"),
        (
            "partitioning a materialized view",
            {"partitioning": {"column": "day", "by": "List"}},
            "spec.partitioning needs storage Table",
        ),
        (
            "a range without its period",
            {"storage": "Table", "partitioning": {"column": "day", "by": "Range"}},
            "period is required with by Range",
        ),
        (
            "retention of a list",
            {"storage": "Table", "partitioning": {"column": "day", "by": "List", "retain": "26w"}},
            "apply only to Range",
        ),
        (
            "an append-only source decoded from the WAL",
            {
                "storage": "Table",
                "incremental": {
                    "keyColumns": ["region"],
                    "capture": "LogicalDecoding",
                    "sources": [{"table": "s.t", "columns": ["region"], "appendOnly": {"column": "id"}}],
                },
            },
            "appendOnly needs capture Triggers",
        ),
        (
            "an append-only source under a live view",
            {
                "storage": "Table",
                "incremental": {
                    "keyColumns": ["region"],
                    "liveView": True,
                    "sources": [{"table": "s.t", "columns": ["region"], "appendOnly": {"column": "id"}}],
                },
            },
            "appendOnly cannot be combined with liveView",
        ),
        (
            "a malformed retention window",
            {"storage": "Table", "partitioning": {"column": "day", "by": "Range", "period": "Week", "retain": "1y"}},
            "should match",
        ),
    ],
)
def test_the_apiserver_refuses_invalid_resources(
    control_plane: ControlPlane, case: str, change: dict[str, Any], expected: str
) -> None:
    ns = namespace(control_plane, "e2e-validation")
    document = mv("bad", ns)
    document["spec"].update(change)
    status, body = control_plane.request("POST", MV_PATH.format(ns=ns) + "?fieldValidation=Strict", document)
    assert status in (400, 422), (status, body)
    assert expected in str(body.get("message", body)), body


def test_schema_and_name_are_immutable_and_columns_show(control_plane: ControlPlane) -> None:
    ns = namespace(control_plane, "e2e-immutable")
    status, body = control_plane.request("POST", MV_PATH.format(ns=ns), mv("fixed", ns, schema="ops"))
    assert status == 201, body
    for patch in ({"spec": {"schema": "other"}}, {"spec": {"name": "renamed"}}):
        status, body = control_plane.request(
            "PATCH", MV_PATH.format(ns=ns) + "/fixed", patch, content_type="application/merge-patch+json"
        )
        assert status == 422, body
        assert "immutable" in body["message"]
    status, table = control_plane.request(
        "GET", MV_PATH.format(ns=ns), accept="application/json;as=Table;v=v1;g=meta.k8s.io"
    )
    assert status == 200
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Relation",
        "Ready",
        "Last Refresh",
        "Duration",
        "Rows",
        "Age",
    ]
    status, defaulted = control_plane.request("GET", MV_PATH.format(ns=ns) + "/fixed")
    assert defaulted["spec"]["refresh"] == {
        "mode": "Auto",
        "timeout": "5m",
        "lockTimeout": "5s",
        "onlyIfChanged": False,
        "suspend": False,
    }
    assert defaulted["spec"]["deletionPolicy"] == "Retain"


def granted_in(control_plane: ControlPlane, token: str, ns: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the token may use in namespace ns, as the apiserver's RBAC says."""
    status, review = control_plane.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": ns}},
        token=token,
    )
    assert status == 201, review
    return {
        (group, resource, verb)
        for rule in review["status"]["resourceRules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def test_the_operator_service_account_has_only_what_it_uses(control_plane: ControlPlane) -> None:
    token = operator_token(control_plane)
    granted = granted_in(control_plane, token, "default")
    ours = {
        g
        for g in granted
        if g[0] in ("matview.dev", "")
        and g[1] in ("materializedviews", "materializedviews/status", "secrets", "events")
    }
    assert ours == {("matview.dev", "materializedviews", v) for v in ("get", "list", "watch", "patch")} | {
        ("matview.dev", "materializedviews/status", "patch"),
        ("", "events", "create"),
    }
    assert not {g for g in granted if g[1] == "secrets"}, "no Secret may be readable where no binding says so"
    ns = namespace(control_plane, "e2e-secrets-access")
    bind_secrets(control_plane, ns)
    assert {g for g in granted_in(control_plane, token, ns) if g[1] == "secrets"} == {("", "secrets", "get")}


def bind_secrets(plane: ControlPlane, ns: str) -> None:
    """What manifests/secrets-access does for one namespace."""
    import yaml

    binding = yaml.safe_load((ROOT / "manifests/secrets-access/role-binding.yaml").read_text())
    binding["metadata"]["namespace"] = ns
    plane.create(binding)


def start_operator(
    control_plane: ControlPlane, workdir: Path, watched: str = "e2e-operator", shard: tuple[int, int] = (0, 1)
) -> tuple[subprocess.Popen[str], int]:
    """`matview operator` as its ServiceAccount, watching one namespace, with fast retries (shard: index, count)."""
    kubeconfig = control_plane.kubeconfig(
        operator_token(control_plane), workdir / f"operator-{time.time_ns()}.kubeconfig"
    )
    metrics = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MATVIEW_RETRY_SECONDS": "1",
        "MATVIEW_BUSY_RETRY_SECONDS": "0.6",
        "MATVIEW_STALLED_RETRY_SECONDS": "2",
    }
    log = workdir / f"operator-{time.time_ns()}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "matview.cli",
            "operator",
            "--namespace",
            watched,
            "--metrics-port",
            str(metrics),
            "--liveness",
            f"http://127.0.0.1:{free_port()}/healthz",
            *("--shard-index", str(shard[0]), "--shard-count", str(shard[1])),
        ],
        # A file, not a pipe: nobody reads a pipe while the test runs, and once its buffer is full every
        # thread of the operator that logs would block (seen during the apiserver outage test).
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    _LOGS[process.pid] = log
    return process, metrics


#: Each started operator's log file, by pid.
_LOGS: dict[int, Path] = {}


def stop_operator(process: subprocess.Popen[str]) -> str:
    """SIGTERM (SIGKILL after 60 s); the operator's output."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log = _LOGS.pop(process.pid, None)
    return log.read_text(errors="replace") if log is not None else ""


@pytest.fixture
def operator_process(control_plane: ControlPlane, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    process, metrics = start_operator(control_plane, tmp_path)
    try:
        yield process, metrics
    finally:
        print(stop_operator(process)[-5000:])


def test_operator_end_to_end(control_plane: ControlPlane, operator_process: Any, dsn: str) -> None:
    process, metrics_port = operator_process
    ns = namespace(control_plane, "e2e-operator")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO public.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 100) g"
        )
    path = MV_PATH.format(ns=ns)
    status, body = control_plane.request(
        "POST", path, mv("sales-by-region", ns, refresh={"interval": "2s"}, deletionPolicy="Delete")
    )
    assert status == 201, body

    forbidden = wait_for(lambda: condition(control_plane, ns, "sales-by-region", "Ready"), "a Ready condition")
    assert (forbidden["status"], forbidden["reason"]) == ("False", "SecretForbidden")
    assert "matview-operator-secrets" in forbidden["message"]
    bind_secrets(control_plane, ns)
    wait_for(
        lambda: (c := condition(control_plane, ns, "sales-by-region", "Ready")) and c["reason"] == "SecretNotFound",
        "SecretNotFound once the operator may read Secrets here",
    )
    wrong = dsn.rsplit(":", 1)[0] + ":1/nowhere?connect_timeout=1"
    control_plane.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": ns},
            "stringData": {"uri": wrong},
        }
    )
    wait_for(
        lambda: (
            (c := condition(control_plane, ns, "sales-by-region", "Ready")) and c["reason"] == "DatabaseUnreachable"
        ),
        "DatabaseUnreachable while the Secret points nowhere",
    )
    status, body = control_plane.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/secrets/db",
        {"stringData": {"uri": dsn}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    ready = wait_for(
        lambda: (c := condition(control_plane, ns, "sales-by-region", "Ready")) and c["status"] == "True" and c,
        "Ready=True once the Secret exists",
    )
    assert ready["observedGeneration"] == 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sales").fetchone() == (100,)
        assert conn.execute("SELECT 1 FROM pg_matviews WHERE matviewname = 'sales_by_region'").fetchone() == (1,)

    def refreshed_twice() -> bool:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            counted = line.startswith("matview_refreshes_total{") and 'result="success"' in line
            if counted and 'name="sales-by-region"' in line and float(line.rsplit(" ", 1)[1]) >= 2:
                return True
        return False

    wait_for(refreshed_twice, "two scheduled refreshes counted in /metrics")
    status, body = control_plane.request("GET", path + "/sales-by-region")
    assert body["status"]["lastRefresh"]["result"] == "success"
    assert body["status"]["relation"] == "public.sales_by_region"

    status, body = control_plane.request(
        "PATCH",
        path + "/sales-by-region",
        {"spec": {"query": QUERY.replace("sum(amount)", "sum(amount) * 2")}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    wait_for(
        lambda: (
            (c := condition(control_plane, ns, "sales-by-region", "Ready"))
            and c.get("observedGeneration") == 2
            and c["status"] == "True"
        ),
        "the edited spec reconciled",
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT sum(total) FROM public.sales_by_region").fetchone() == (10100,)

    status, _ = control_plane.request("DELETE", path + "/sales-by-region")
    assert status == 200
    wait_for(lambda: control_plane.request("GET", path + "/sales-by-region")[0] == 404, "the finalizer to be released")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1 FROM pg_matviews WHERE matviewname = 'sales_by_region'").fetchone() is None
    status, body = control_plane.request("POST", path, mv("kept", ns, name="kept_view", deletionPolicy="Retain"))
    assert status == 201, body
    wait_for(lambda: (c := condition(control_plane, ns, "kept", "Ready")) and c["status"] == "True", "kept Ready")
    control_plane.request("DELETE", path + "/kept")
    wait_for(lambda: control_plane.request("GET", path + "/kept")[0] == 404, "the Retain finalizer to be released")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1 FROM pg_matviews WHERE matviewname = 'kept_view'").fetchone() == (1,)
    assert process.poll() is None


def dry_run(control_plane: ControlPlane, document: dict[str, Any], label: str) -> None:
    """Server-side dry-run with strict field validation: create, or update when the object exists."""
    from tests.e2e.conftest import collection_path

    status, body = control_plane.request(
        "POST", collection_path(document) + "?dryRun=All&fieldValidation=Strict", document
    )
    assert status in (200, 201, 409), (label, status, body)
    if status == 409:  # already created by the fixture: a dry-run update must pass too
        name = document["metadata"]["name"]
        status, body = control_plane.request(
            "PATCH",
            collection_path(document) + f"/{name}?dryRun=All&fieldValidation=Strict",
            document,
            content_type="application/merge-patch+json",
        )
        assert status == 200, (label, status, body)


def test_every_core_manifest_passes_server_side_dry_run(control_plane: ControlPlane) -> None:
    import yaml

    for path in [*sorted((ROOT / "manifests/core").glob("*.yaml")), ROOT / "manifests/sharded/statefulset.yaml"]:
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            dry_run(control_plane, document, path.name)


def test_the_sharded_install_is_the_core_one_with_a_statefulset_of_shards() -> None:
    """manifests/sharded: the core install, its Deployment deleted and a StatefulSet put in its place, whose pod
    is the Deployment's but for the shard count (equal to its replicas) and the index from the pod-index label."""
    import yaml

    overlay = yaml.safe_load((ROOT / "manifests/sharded/kustomization.yaml").read_text())
    assert overlay["resources"] == ["../core", "statefulset.yaml"]
    deleted = yaml.safe_load(overlay["patches"][0]["patch"])
    deployment = yaml.safe_load((ROOT / "manifests/core/deployment.yaml").read_text())
    assert deleted["$patch"] == "delete" and deleted["kind"] == deployment["kind"] == "Deployment"
    assert deleted["metadata"] == {k: deployment["metadata"][k] for k in ("name", "namespace")}
    shards = yaml.safe_load((ROOT / "manifests/sharded/statefulset.yaml").read_text())
    pod, plain = shards["spec"]["template"], deployment["spec"]["template"]
    container, expected = pod["spec"]["containers"][0], plain["spec"]["containers"][0]
    count = container["args"][container["args"].index("--shard-count") + 1]
    assert int(count) == shards["spec"]["replicas"] > 1, "one pod per shard"
    assert container["args"][-4:] == ["--shard-count", count, "--shard-index", "$(MATVIEW_SHARD_INDEX)"]
    assert container["args"][:-4] == expected["args"] and container["env"][:-1] == expected["env"]
    index = container["env"][-1]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    same = {k: v for k, v in container.items() if k not in ("args", "env")}
    assert same == {k: v for k, v in expected.items() if k not in ("args", "env")}
    assert pod["metadata"] == plain["metadata"] and shards["spec"]["selector"] == deployment["spec"]["selector"]
