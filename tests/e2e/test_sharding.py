"""Shards on the real kube-apiserver (#24): each replica's watch selects its own buckets on the server.

Two operator processes split the views of one namespace: every view gets its bucket label from its owner,
each becomes Ready, each is scheduled by exactly one replica; a label edited by hand is put back; and going
from two shards to three leaves no view owned twice or by none. The apiserver does the label selection here,
as in a cluster (kmock does not implement selectors).
"""

from __future__ import annotations

import functools
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.constants import BUCKET_LABEL
from matview.k8s import sharding
from tests.e2e.conftest import ControlPlane, operator_token
from tests.e2e.test_e2e import MV_PATH, bind_secrets, condition, mv, namespace, start_operator, stop_operator, wait_for

NAMESPACE = "e2e-shards"
VIEWS = [f"shard-view-{i}" for i in range(10)]


def scheduled_by(metrics_port: int) -> set[str] | None:
    """The views a replica schedules: each has its interval series from its first scheduling on (None: its
    metrics endpoint is not up yet)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except urllib.error.URLError:
        return None
    return set(re.findall(r'^matview_refresh_interval_seconds\{[^}]*name="([^"]+)"', text, re.MULTILINE))


def labels_of(plane: ControlPlane, name: str) -> dict[str, str]:
    status, body = plane.request("GET", MV_PATH.format(ns=NAMESPACE) + f"/{name}")
    assert status == 200, body
    return dict(body["metadata"].get("labels") or {})


def run_shards(plane: ControlPlane, workdir: Path, count: int) -> list[tuple[Any, int]]:
    return [start_operator(plane, workdir, NAMESPACE, shard=(index, count)) for index in range(count)]


def is_ready(plane: ControlPlane, name: str) -> bool:
    found = condition(plane, NAMESPACE, name, "Ready")
    return found is not None and found["status"] == "True"


def split_as_owned(shards: list[tuple[Any, int]], count: int) -> bool:
    """Each replica schedules exactly the views it owns (none twice, none by nobody)."""
    seen = [scheduled_by(port) for _, port in shards]
    return all(
        seen[index] == {name for name in VIEWS if sharding.shard_of(NAMESPACE, name, count) == index}
        for index in range(count)
    )


def test_shards_select_their_own_views_on_the_apiserver(control_plane: ControlPlane, dsn: str, tmp_path: Path) -> None:
    namespace(control_plane, NAMESPACE)
    bind_secrets(control_plane, NAMESPACE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA IF NOT EXISTS shards;"
            "CREATE TABLE IF NOT EXISTS shards.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO shards.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 30) g ON CONFLICT DO NOTHING"
        )
    control_plane.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db", "namespace": NAMESPACE},
            "stringData": {"uri": dsn},
        }
    )
    assert {sharding.shard_of(NAMESPACE, name, 2) for name in VIEWS} == {0, 1}, "both shards own some"
    query = "SELECT region, sum(amount) AS total FROM shards.sales GROUP BY region"
    shards = run_shards(control_plane, tmp_path, 2)
    try:
        for name in VIEWS:
            status, body = control_plane.request(
                "POST",
                MV_PATH.format(ns=NAMESPACE),
                mv(name, NAMESPACE, query=query, schema="shards", refresh={"interval": "1h"}),
            )
            assert status == 201, body
        for name in VIEWS:
            wait_for(functools.partial(is_ready, control_plane, name), f"{name} Ready")
            assert labels_of(control_plane, name)[BUCKET_LABEL] == sharding.label_value(NAMESPACE, name)
        wait_for(lambda: split_as_owned(shards, 2), "each view scheduled by its own shard only")

        # A bucket label edited by hand puts the view in the other shard's selection: that shard puts it back.
        moved = VIEWS[0]
        own = sharding.shard_of(NAMESPACE, moved, 2)
        foreign = next(b for b in range(sharding.BUCKETS) if sharding.shard_of_bucket(b, 2) != own)
        status, body = control_plane.request(
            "PATCH",
            MV_PATH.format(ns=NAMESPACE) + f"/{moved}",
            {"metadata": {"labels": {BUCKET_LABEL: str(foreign)}}},
            content_type="application/merge-patch+json",
        )
        assert status == 200, body
        wait_for(
            lambda: labels_of(control_plane, moved).get(BUCKET_LABEL) == sharding.label_value(NAMESPACE, moved),
            "the hand-edited label put back",
        )
        wait_for(lambda: split_as_owned(shards, 2), "the view still scheduled by its own shard only")
    finally:
        logs = [stop_operator(process) for process, _ in shards]
    assert not any("Traceback" in log for log in logs), "\n".join(logs)[-5000:]

    # Three shards now (a StatefulSet scaled up): the same views split three ways, none twice, none missed.
    assert {sharding.shard_of(NAMESPACE, name, 3) for name in VIEWS} == {0, 1, 2}
    shards = run_shards(control_plane, tmp_path, 3)
    try:
        wait_for(lambda: split_as_owned(shards, 3), "each view scheduled by its own shard of three only")
    finally:
        logs = [stop_operator(process) for process, _ in shards]
    assert not any("Traceback" in log for log in logs), "\n".join(logs)[-5000:]


def test_the_labeler_pages_through_the_unlabelled_views_and_labels_only_its_own(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list before each watch goes a page at a time (a first sharded start over 10,000 views decoded them
    all at once in every replica), with the operator's own token: each shard labels the views it owns,
    unlabelled or labelled with something that is no bucket."""
    # Imported here, not at collection: the kubernetes package reads KUBECONFIG once, when first imported,
    # and tests/k8s/conftest.py (collected after this module) sets it for kopf's own login.
    import kubernetes

    from matview.k8s import kube, labeler

    ns = namespace(control_plane, "e2e-labeler")
    names = [f"paged-{i}" for i in range(7)]
    for index, name in enumerate(names):
        document = mv(name, ns)
        if index % 3 == 1:  # a label that names no bucket leaves a view in no shard's selection too
            document["metadata"]["labels"] = {BUCKET_LABEL: "not-a-bucket" if index == 1 else "1024"}
        status, body = control_plane.request("POST", MV_PATH.format(ns=ns), document)
        assert status == 201, body
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig(operator_token(control_plane), tmp_path / "kc")))
    monkeypatch.setattr(labeler, "LIST_PAGE", 2)
    kube.reset()
    try:
        owned = {name for name in names if sharding.shard_of(ns, name, 2) == 0}
        assert 0 < len(owned) < len(names)
        assert any(index % 3 == 1 for index, name in enumerate(names) if name in owned), "a bad label to put right"
        shard = labeler.Labeler(lambda namespace, name: namespace == ns and name in owned, (ns,))
        api = kubernetes.client.CustomObjectsApi(kube.api_client())
        since = shard._label_listed(api, ns)
        assert since.isdigit(), "a resourceVersion to watch from"
        assert shard.labelled == len(owned)
        for name in names:
            status, body = control_plane.request("GET", MV_PATH.format(ns=ns) + f"/{name}")
            found = (body["metadata"].get("labels") or {}).get(BUCKET_LABEL)
            if name in owned:
                assert found == sharding.label_value(ns, name), name
            else:
                assert found in (None, "not-a-bucket", "1024"), name
        assert shard._label_listed(api, ns) and shard.labelled == len(owned), "the second shard's views are left"
    finally:
        kube.reset()
