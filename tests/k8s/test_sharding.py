"""A sharded replica's requests (#24), against kmock: its watch asks the apiserver for its own buckets only,
and it labels the unlabelled views it owns (and no others). The selection itself is the apiserver's (kmock
does not implement selectors): tests/e2e/test_sharding.py runs shards on the real one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import pytest
from kopf.testing import KopfRunner

from matview.constants import BUCKET_LABEL, PLURAL
from matview.k8s import labeler, main, sharding
from matview.k8s.settings import config_from_environment
from tests.k8s.conftest import NAMESPACE, Cluster, eventually, running_operator, settle
from tests.k8s.test_operator import spec

INDEX, COUNT = 1, 2


@pytest.fixture
async def shard(cluster: Cluster, dsn: str) -> AsyncIterator[KopfRunner]:
    main.use(dataclasses.replace(config_from_environment(), shard_index=INDEX, shard_count=COUNT))
    try:
        async with running_operator(cluster) as runner:
            yield runner
    finally:
        main._config = None  # the next operator reads its settings again


def named(owner: int) -> str:
    return next(f"view-{i}" for i in range(100) if sharding.shard_of(NAMESPACE, f"view-{i}", COUNT) == owner)


def selectors(cluster: Cluster, agent_prefix: str) -> set[str]:
    """The label selectors of the list and watch requests on MaterializedViews from one client."""
    return {
        str(request.params.get("labelSelector"))
        for request in cluster.server
        if request.resource is not None
        and request.resource.plural == PLURAL
        and str(getattr(request.method, "value", request.method)).upper().endswith("GET")
        and request.name is None
        and request.headers.get("User-Agent", "").startswith(agent_prefix)
    }


async def test_a_shard_watches_its_buckets_and_labels_only_the_views_it_owns(cluster: Cluster, shard: Any) -> None:
    mine, theirs = named(INDEX), named(1 - INDEX)
    await cluster.create_view(mine, spec())
    await cluster.create_view(theirs, spec())

    async def labelled() -> bool:
        view = await cluster.get_view(mine)
        return bool(view and (view["metadata"].get("labels") or {}).get(BUCKET_LABEL))

    await eventually(labelled, "the owned view labelled")
    view = await cluster.get_view(mine)
    assert view is not None and view["metadata"]["labels"][BUCKET_LABEL] == sharding.label_value(NAMESPACE, mine)
    await settle(cluster.server)
    other = await cluster.get_view(theirs)
    assert other is not None and BUCKET_LABEL not in (other["metadata"].get("labels") or {}), "its owner labels it"
    assert selectors(cluster, "kopf/") == {sharding.selector(INDEX, COUNT)}, "kopf's watch selects the buckets"
    assert selectors(cluster, "OpenAPI-Generator/") == {labeler.UNLABELLED}, "the labeler asks for unlabelled views"


def from_labeler(request: Any, watch: bool) -> bool:
    """Whether request is one of the labeler's lists (watch False) or watches of MaterializedViews."""
    return (
        request.resource is not None
        and request.resource.plural == PLURAL
        and request.params.get("labelSelector") == labeler.UNLABELLED
        and (str(request.params.get("watch", "")).lower() == "true") == watch
    )


def labeler_requests(cluster: Cluster, watch: bool) -> list[Any]:
    """The labeler's lists or watches so far, in order."""
    return [request for request in cluster.server if from_labeler(request, watch)]


async def test_the_labeler_lists_again_after_refused_lists_and_an_expired_watch(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The labeler's own path to the apiserver, under faults: two lists refused (503, 500) and a watch answered
    410 Gone (its version expired). Each time it lists again, and every view it owns gets its label once."""
    monkeypatch.setattr(labeler, "ERROR_BACKOFF_SECONDS", 0.05)
    list_faults = [kmock.Response(status=503), kmock.Response(status=500)]
    watch_faults = [kmock.Response(status=410)]

    def serve(faults: list[kmock.Response]) -> Callable[[], kmock.Response | StopIteration]:
        return lambda: faults.pop(0) if faults else StopIteration()

    cluster.server[lambda request: from_labeler(request, watch=False)].override << serve(list_faults)
    cluster.server[lambda request: from_labeler(request, watch=True)].override << serve(watch_faults)
    await cluster.create_view("before", spec())
    labels = labeler.Labeler(lambda namespace, name: True, (NAMESPACE,))
    running = asyncio.create_task(labels.run())
    try:

        async def labelled(name: str) -> bool:
            view = await cluster.get_view(name)
            label = (view or {}).get("metadata", {}).get("labels", {}).get(BUCKET_LABEL)
            return bool(label == sharding.label_value(NAMESPACE, name))

        await eventually(lambda: labelled("before"), "the view listed after two refusals labelled")
        await eventually(lambda: not watch_faults and len(labeler_requests(cluster, watch=True)) >= 2, "watched again")
        assert not list_faults
        assert len(labeler_requests(cluster, watch=False)) >= 4, "refused twice, listed, listed again after the 410"
        await cluster.create_view("after", spec())
        await eventually(lambda: labelled("after"), "the view created after the faults labelled")
        patches = [
            request
            for request in cluster.server
            if request.resource is not None
            and request.resource.plural == PLURAL
            and str(getattr(request.method, "value", request.method)).upper() == "PATCH"
        ]
        assert sorted(str(request.name) for request in patches) == ["after", "before"], "each view labelled once"
        assert labels.labelled == 2
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_labeler_forbidden_to_list_the_cluster_says_how_to_fix_it_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`kopf run -m matview.k8s.main` gives the labeler no namespaces, so it lists the whole cluster; under
    namespaced RBAC that is a 403 at every retry. It says so once, naming the fix, and keeps retrying."""
    monkeypatch.setattr(labeler, "MAX_ERROR_BACKOFF_SECONDS", 0.1)
    cluster.server[lambda request: from_labeler(request, watch=False)].override << (lambda: kmock.Response(status=403))
    labels = labeler.Labeler(lambda namespace, name: True)
    running = asyncio.create_task(labels.run())
    try:
        await eventually(lambda: len(labeler_requests(cluster, watch=False)) >= 4, "the list retried")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    said = [record.getMessage() for record in caplog.records]
    said = [message for message in said if "listing them across the cluster is forbidden" in message]
    assert len(said) == 1 and "matview operator --namespace" in said[0]
