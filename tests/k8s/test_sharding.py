"""A sharded replica's requests (#24), against kmock: its watch asks the apiserver for its own buckets only,
and it labels the unlabelled views it owns (and no others). The selection itself is the apiserver's (kmock
does not implement selectors): tests/e2e/test_sharding.py runs shards on the real one."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

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
