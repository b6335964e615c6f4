"""The ClusterRole in manifests/ grants exactly what the operator uses: no request refused, no rule unused.

A scenario exercising every behaviour (reconcile, refresh on request, an invalid spec with its event,
deletion) runs against kmock; each request the operator made is mapped to the RBAC (group, resource,
verb) the apiserver would check. (The real-apiserver e2e issue checks the same against real RBAC.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.k8s.conftest import Cluster, eventually, settle
from tests.k8s.test_operator import exists, refresh_runs, setup_sales, spec

ROOT = Path(__file__).resolve().parents[2]
VERBS = {
    ("list", "GET"): "list",
    ("watch", "GET"): "watch",
    ("fetch", "GET"): "get",
    ("create", "POST"): "create",
    ("update", "PATCH"): "patch",
    ("update", "PUT"): "update",
    ("delete", "DELETE"): "delete",
}


def granted() -> set[tuple[str, str, str]]:
    documents = list(yaml.safe_load_all((ROOT / "manifests/core/rbac.yaml").read_text()))
    roles = [d for d in documents if d["kind"] == "ClusterRole"]
    assert {r["metadata"]["name"] for r in roles} == {"matview-operator", "matview-operator-secrets"}
    return {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used(server: Any) -> set[tuple[str, str, str]]:
    found = set()
    for request in server:
        agent = request.headers.get("User-Agent", "")
        if agent.startswith("kmock/") or request.resource is None or request.resource.plural is None:
            continue  # the test's own client, or discovery (allowed to every authenticated user)
        action = str(getattr(request.action, "value", request.action)).lower().split(".")[-1]
        method = str(getattr(request.method, "value", request.method)).upper().split(".")[-1]
        verb = VERBS[(action, method)]
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        found.add((request.resource.group or "", resource, verb))
    return found


async def test_the_operator_uses_exactly_the_granted_permissions(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec(refresh={"interval": "1h"}))
    await eventually(lambda: exists(dsn), "the view")
    await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready")
    before = refresh_runs(dsn)
    await cluster.patch_view(
        "sales-by-region", {"metadata": {"annotations": {"matview.dev/refresh-requested-at": "now"}}}
    )
    # More than one may run (kmock, without optimistic locking, can hand the scheduler a status without the
    # build's time, which makes the first refresh due at once); this test is about the verbs used.
    await eventually(lambda: refresh_runs(dsn) > before, "the requested refresh")
    await cluster.create_view("broken", spec(query="DELETE FROM public.sales"))
    await eventually(lambda: cluster.condition("broken", "Ready"), "the broken one reported")
    await cluster.delete_view("sales-by-region")

    async def gone() -> bool:
        return await cluster.get_view("sales-by-region") is None

    await eventually(gone, "deletion")
    await settle(cluster.server)
    calls = used(cluster.server)
    assert calls <= granted(), f"refused by RBAC: {sorted(calls - granted())}"
    # Status writes reuse the object from the watch; a fresh GET happens only after a write conflict (409),
    # which kmock, having no optimistic locking, never answers. The real apiserver's e2e tests exercise it.
    conflict_fallback = {("matview.dev", "materializedviews", "get")}
    assert granted() - conflict_fallback <= calls, f"granted but never used: {sorted(granted() - calls)}"
