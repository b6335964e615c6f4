"""The operator against kmock (an in-memory Kubernetes API) and the real PostgreSQL the suite starts.

kopf runs in-process against kmock through an ordinary kubeconfig, exactly as it
would against a cluster; every database effect is checked in PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

# kubernetes.config reads KUBECONFIG once, when first imported: fix the path now, rewrite the file per test.
KUBECONFIG = Path(tempfile.gettempdir()) / f"matview-test-kubeconfig-{os.getpid()}"
os.environ["KUBECONFIG"] = str(KUBECONFIG)

# The operator reads these when its module is imported: fast retries and polls for tests.
os.environ.update(
    {
        "MATVIEW_METRICS_PORT": "0",
        "MATVIEW_RETRY_SECONDS": "1",
        "MATVIEW_STALLED_RETRY_SECONDS": "2",
        "MATVIEW_BUSY_RETRY_SECONDS": "0.6",
        "MATVIEW_DRIFT_CHECK_SECONDS": "2",
    }
)

import kmock  # noqa: E402
import kopf  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402

import matview.k8s.main  # noqa: E402, F401 - registers the handlers
from matview.constants import GROUP, PLURAL, VERSION  # noqa: E402
from matview.k8s import kube  # noqa: E402

MV = f"{GROUP}/{VERSION}/{PLURAL}"
NAMESPACE = "ns1"


class Cluster:
    """A small client for the mock API, speaking plain HTTP like kubectl would."""

    def __init__(self, server: kmock.KubernetesEmulator) -> None:
        self.server = server

    def _path(self, name: str | None = None, namespace: str = NAMESPACE) -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    async def create_view(
        self, name: str, spec: dict[str, Any], namespace: str = NAMESPACE, annotations: dict[str, str] | None = None
    ) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MaterializedView",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "generation": 1,
                "resourceVersion": "1",
                "annotations": annotations or {},
            },
            "spec": spec,
        }
        response = await self.server.post(self._path(namespace=namespace), json=body)
        assert response.status < 300, await response.text()

    async def patch_view(self, name: str, patch: dict[str, Any], namespace: str = NAMESPACE) -> None:
        response = await self.server.patch(
            self._path(name, namespace), json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )
        assert response.status < 300, await response.text()

    async def edit_spec(self, name: str, spec_patch: dict[str, Any]) -> None:
        current = await self.get_view(name)
        assert current is not None
        generation = int(current["metadata"].get("generation") or 1) + 1  # as the apiserver would bump it
        await self.patch_view(name, {"metadata": {"generation": generation}, "spec": spec_patch})

    async def get_view(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        response = await self.server.get(self._path(name, namespace))
        if response.status == 404:
            return None
        data: dict[str, Any] = await response.json()
        return data

    async def delete_view(self, name: str, namespace: str = NAMESPACE) -> None:
        response = await self.server.delete(self._path(name, namespace))
        assert response.status < 300, await response.text()

    async def put_secret(self, name: str, data: dict[str, str], namespace: str = NAMESPACE) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": encoded,
        }
        response = await self.server.post(f"/api/v1/namespaces/{namespace}/secrets", json=body)
        if response.status == 409:
            response = await self.server.patch(
                f"/api/v1/namespaces/{namespace}/secrets/{name}",
                json=body,
                headers={"Content-Type": "application/merge-patch+json"},
            )
        assert response.status < 300, await response.text()

    async def events(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        response = await self.server.get(f"/api/v1/namespaces/{namespace}/events")
        data = await response.json()
        return list(data.get("items", []))

    async def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        view = await self.get_view(name)
        conditions = ((view or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c.get("type") == type_), None)


async def eventually(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    """Poll an async or sync check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def cluster(kmock: kmock.KubernetesEmulator) -> Cluster:
    kmock.resources[MV] = kmock_resource(kind="MaterializedView", subresources=["status"])
    kmock.resources["v1/secrets"] = kmock_resource(kind="Secret")
    kmock.resources["v1/events"] = kmock_resource(kind="Event")
    # kopf's backbone: a real apiserver always serves these, kopf waits for them in discovery.
    kmock.resources["v1/namespaces"] = kmock_resource(kind="Namespace", namespaced=False)
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock_resource(
        kind="CustomResourceDefinition", namespaced=False
    )
    KUBECONFIG.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{str(kmock.url).rstrip('/')}'}}}}]\n"
        "users: [{name: test, user: {token: test-token}}]\n"
        "contexts: [{name: test, context: {cluster: kmock, user: test}}]\n"
        "current-context: test\n"
    )
    kube.reset()
    return Cluster(kmock)


def kmock_resource(kind: str, subresources: list[str] | None = None, namespaced: bool = True) -> Any:
    import kmock as _kmock

    return _kmock.ResourceInfo(
        kind=kind,
        namespaced=namespaced,
        subresources=subresources or [],
        verbs=["get", "list", "watch", "create", "patch", "update", "delete"],
    )


async def settle(server: kmock.KubernetesEmulator, quiet: float = 0.7, limit: float = 10) -> None:
    """Wait until the operator made no API request for `quiet` seconds (at most `limit`).

    kopf (1.45) can respawn a daemon for an event it processes while stopping, after its daemon
    killer has exited; that orphan is then reported as a hung task. Stopping a quiet operator avoids it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    seen, since = len(server), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        if len(server) != seen:
            seen, since = len(server), loop.time()
        elif loop.time() - since >= quiet:
            return


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster) -> AsyncIterator[KopfRunner]:
    """`kopf run -m matview.k8s.main` in a background thread with its own event loop (kopf's KopfRunner),
    stopped once the mock API has been quiet a moment. Entering and leaving happen off the event loop, which
    must keep serving the mock API meanwhile."""
    runner = KopfRunner(
        ["run", "--standalone", "--namespace", NAMESPACE, "-m", "matview.k8s.main"],
        registry=kopf.get_default_registry(),
        timeout=60,
        reraise=False,
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await settle(cluster.server)
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exception is None, f"{runner.exception!r}\n{runner.output[-4000:]}"


@pytest.fixture
async def operator(cluster: Cluster, dsn: str) -> AsyncIterator[KopfRunner]:
    """The operator against the mock API. It depends on dsn only so that it stops before the test database
    is dropped."""
    async with running_operator(cluster) as runner:
        yield runner
