"""The operator's pure parts: credentials from Secret data, redaction, conditions, status builders."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import gc
import json
import tracemalloc
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from matview.constants import REFRESH_REQUESTED_ANNOTATION
from matview.k8s import conditions, status
from matview.k8s.credentials import CredentialsError, dsn_from_secret, redact
from matview.k8s.reconcile import Outcome, moved_relation, status_after
from matview.k8s.watch import snapshot
from matview.outcomes import Outcome as RefreshOutcome
from matview.plan.partitions import RebuildProgress
from matview.refresh import RefreshResult
from tests.helpers import view

ROOT = Path(__file__).resolve().parents[2]

T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def encoded(**values: str) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}


def test_uri_key_host_keys_and_custom_key() -> None:
    assert dsn_from_secret("db", encoded(uri="postgresql://a@h/d")) == "postgresql://a@h/d"
    built = dsn_from_secret("db", encoded(host="db.svc", port="5433", dbname="rep", user="mv", password="p w"))
    assert "host=db.svc" in built and "port=5433" in built and "dbname=rep" in built and "password='p w'" in built
    assert dsn_from_secret("db", encoded(conn="postgresql://x@y/z"), key="conn") == "postgresql://x@y/z"


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({}, "uri", "has no key 'uri' (nor host and dbname keys); keys present: none"),
        ({"host": "h"}, "uri", "keys present: host"),
        ({"uri": "x"}, "conn", "has no key 'conn'"),
    ],
)
def test_missing_keys_are_named(data: dict[str, str], key: str, expected: str) -> None:
    with pytest.raises(CredentialsError) as caught:
        dsn_from_secret("db", encoded(**data), key)
    assert caught.value.reason == conditions.Reason.SECRET_KEY_MISSING
    assert expected in str(caught.value)


def test_redaction_removes_the_password_and_the_dsn() -> None:
    dsn = "postgresql://app:S3cr3t@db:5432/reporting"
    message = f"connection to {dsn} failed: password S3cr3t rejected"
    cleaned = redact(message, dsn)
    assert "S3cr3t" not in cleaned
    assert "<dsn>" in cleaned
    assert redact("no secret here", None) == "no secret here"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:se%cret@db:5432/reporting",  # a stray %: libpq cannot parse it, and quotes the token
        "postgresql://app:secret%@db/reporting",
        "host=db user=app password='se cret",  # an unterminated quote
        "host=db password=se%cret dbname=x",
    ],
)
def test_redaction_works_on_a_dsn_libpq_cannot_parse(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
        parse_error = ""
    except Exception as exc:  # what psycopg says is what the operator would report
        parse_error = str(exc)
    message = f"{parse_error} while connecting with {dsn.replace('db', 'db ')}"
    cleaned = redact(message, dsn)
    for secret in ("se%cret", "secret%", "se cret", "cret"):
        if secret in dsn:
            assert secret not in cleaned, cleaned


def test_transition_time_moves_only_when_status_flips() -> None:
    def ready(
        before: list[conditions.Condition], status: bool, reason: conditions.Reason, generation: int, now: dt.datetime
    ) -> list[conditions.Condition]:
        return conditions.set_condition(
            before,
            type_=conditions.ConditionType.READY,
            status=status,
            reason=reason,
            message=reason.value,
            generation=generation,
            now=now,
        )

    first = ready([], False, conditions.Reason.SECRET_NOT_FOUND, 1, T0)
    later = T0 + dt.timedelta(minutes=5)
    same = ready(first, False, conditions.Reason.DATABASE_UNREACHABLE, 1, later)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] == "2026-11-27T12:00:00Z"
    flipped = ready(same, True, conditions.Reason.RECONCILED, 2, later)
    assert flipped[0]["lastTransitionTime"] == "2026-11-27T12:05:00Z"
    assert flipped[0]["observedGeneration"] == 2


def test_status_after_is_kstatus_shaped() -> None:
    ready = status_after(
        {},
        Outcome(True, conditions.Reason.RECONCILED, "ok", relation="ops.mv", built=True, rows=5, size_bytes=8192),
        3,
        T0,
    )
    by_type = {c["type"]: c for c in ready["conditions"]}
    assert by_type["Ready"]["status"] == "True"
    assert by_type["Reconciling"]["status"] == "False" and by_type["Stalled"]["status"] == "False"
    assert ready["observedGeneration"] == 3 and ready["relation"] == "ops.mv" and ready["rows"] == 5
    assert ready["lastSuccessfulRefreshTime"] == "2026-11-27T12:00:00Z"
    retrying = status_after({}, Outcome(False, conditions.Reason.DATABASE_UNREACHABLE, "down", retry_after=30), 3, T0)
    by_type = {c["type"]: c for c in retrying["conditions"]}
    assert (by_type["Reconciling"]["status"], by_type["Stalled"]["status"]) == ("True", "False")
    stalled = status_after({}, Outcome(False, conditions.Reason.INVALID_SPEC, "bad", stalled=True), 3, T0)
    by_type = {c["type"]: c for c in stalled["conditions"]}
    assert (by_type["Reconciling"]["status"], by_type["Stalled"]["status"]) == ("False", "True")
    assert by_type["Stalled"]["reason"] == "InvalidSpec"


def test_a_renamed_relation_is_refused_on_every_path() -> None:
    assert moved_relation(None, "public.a") is None  # not created yet
    assert moved_relation({"relation": "public.a"}, "public.a") is None
    message = moved_relation({"relation": "public.a"}, "ops.a")
    assert message is not None and "immutable" in message and "public.a" in message and "ops.a" in message


async def test_a_round_without_credentials_could_not_start_and_backs_off_in_the_core() -> None:
    """No usable Secret in the operator's refresh round: the feeder says the round could not start, and the
    one scheduler backs off as after a failed refresh (tests/unit/test_scheduler.py, "could not start")."""
    from matview.k8s.context import OperatorConfig, OperatorContext
    from matview.k8s.watch import WatchFeeder

    context = OperatorContext(config=OperatorConfig(retry_seconds=10, metrics_port=0))
    try:
        feeder = WatchFeeder(context)
        no_secret = view("v", "ns", refresh={"interval": "1h"})
        assert no_secret.secret_ref is None
        assert await feeder.refresh(no_secret.owner, no_secret, manual=False, due_at=None) is None
    finally:
        context.refresher.close()


def test_the_feeders_copy_keeps_what_it_reads_and_drops_copies_of_the_spec() -> None:
    """The feeder holds a copy of every view between events: kubectl's and kopf's annotations (each a copy of
    the spec, with a query of up to 100 KiB) and managedFields are not kept; what it reads is."""
    query = "SELECT " + ", ".join(f"{i} AS c{i}" for i in range(5_000))
    spec = {"query": query, "database": {"secretRef": {"name": "db"}}}
    body: dict[str, Any] = {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {
            "name": "v",
            "namespace": "ns",
            "uid": "u-1",
            "generation": 3,
            "resourceVersion": "42",
            "labels": {"team": "a"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps({"spec": spec}),
                "matview.dev/last-handled-configuration": json.dumps({"spec": spec}),
                REFRESH_REQUESTED_ANNOTATION: "2026-12-03T10:00:00Z",
            },
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:query": {}}}}],
        },
        "spec": spec,
        "status": {"observedGeneration": 3, "conditions": [{"type": "Ready", "status": "True"}]},
    }
    kept = snapshot(body)
    assert kept["metadata"]["annotations"] == {REFRESH_REQUESTED_ANNOTATION: "2026-12-03T10:00:00Z"}
    assert "managedFields" not in kept["metadata"]
    read = ("name", "namespace", "uid", "generation", "resourceVersion", "labels")
    assert {k: kept["metadata"][k] for k in read} == {k: body["metadata"][k] for k in read}
    assert kept["spec"] == spec and kept["status"] == body["status"]
    assert len(json.dumps(kept)) < len(json.dumps(body)) / 2
    kept["status"]["conditions"].append({"type": "Refreshed"})
    assert len(body["status"]["conditions"]) == 1  # a copy: the watch's object is not touched
    del body["metadata"]["annotations"][REFRESH_REQUESTED_ANNOTATION]
    assert "annotations" not in snapshot(body)["metadata"]


def decoded_view(index: int) -> dict[str, Any]:
    """A view as the watch delivers it: decoded from JSON on its own (so nothing is shared with another), with
    the status the operator writes."""
    when = f"2026-12-03T12:{index % 60:02d}:{index % 59:02d}Z"
    condition_rows = [
        ("Ready", "True", "Refreshed", "the view is up to date"),
        ("Progressing", "False", "Idle", "nothing to do"),
        ("Degraded", "False", "AsExpected", "no failure"),
    ]
    decoded: dict[str, Any] = json.loads(
        json.dumps(
            {
                "apiVersion": "matview.dev/v1alpha1",
                "kind": "MaterializedView",
                "metadata": {
                    "name": f"view-{index:05d}",
                    "namespace": "scale",
                    "uid": f"0b1c2d3e-{index:04x}-4a5b-8c9d-0e1f2a3b4c5d",
                    "resourceVersion": str(100_000 + index),
                    "generation": 1,
                    "finalizers": ["matview.dev/cleanup"],
                },
                "spec": {
                    "schema": "scale",
                    "name": f"view_{index:05d}",
                    "query": f"SELECT id, v FROM scale.src WHERE id % 1000 = {index % 1000}",
                    "indexes": [{"columns": ["id"], "unique": True}],
                    "refresh": {"interval": f"{60 + index % 240}s", "mode": "Auto"},
                },
                "status": {
                    "observedGeneration": 1,
                    "rows": 100,
                    "lastRefresh": {"startTime": when, "mode": "Concurrent", "result": "success"},
                    "nextRefreshTime": when,
                    "conditions": [
                        {"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": when}
                        for t, s, r, m in condition_rows
                    ],
                },
            }
        )
    )
    return decoded


def held_bytes(copy_of: Any, views: int = 1_000) -> float:
    """Bytes per view that copies of freshly decoded views keep once the decoded objects are gone."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [copy_of(decoded_view(index)) for index in range(views)]
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == views
    return held / views


def test_the_feeders_copies_share_field_names_and_short_strings() -> None:
    """#24: at 10,000 views the feeder's copies were 87 MiB, mostly field names and values that every view
    repeats; shared, a copy keeps about half of what a deep copy does (measured 9.3 -> 5.1 KB)."""
    first, second = snapshot(decoded_view(1)), snapshot(decoded_view(2))
    assert first == decoded_view(1)
    assert next(iter(first["status"]["conditions"][0])) is next(iter(second["status"]["conditions"][0]))
    assert first["status"]["conditions"][0]["reason"] is second["status"]["conditions"][0]["reason"]
    assert held_bytes(snapshot) < 0.7 * held_bytes(copy.deepcopy)


def test_a_rebuilds_progress_is_in_status_until_the_refresh_ends() -> None:
    started = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC)
    during = status.progress_status(RebuildProgress(started, 12, 53, "weekly_p20261130"), {"rows": 5})
    assert during["rows"] == 5
    assert during["refreshProgress"] == {
        "startTime": "2026-12-04T10:00:00Z",
        "partitionsRebuilt": 12,
        "partitionsToRebuild": 53,
        "lastPartition": "weekly_p20261130",
        "message": "rebuilt 12 of 53 partition(s) one at a time, the last weekly_p20261130",
    }
    for outcome in (RefreshOutcome.SUCCESS, RefreshOutcome.FAILURE):
        result = RefreshResult("public.weekly", "Swap", outcome, "why", started, started, 1.0)
        after = status.refresh_status(copy.deepcopy(during), view("weekly"), result, None, None)
        assert "refreshProgress" not in after and after["rows"] == 5, after


def test_the_status_the_operator_writes_is_the_status_the_crd_declares() -> None:
    """A real apiserver prunes status fields its schema does not declare: every field of the Status type (and of
    its objects) must be in crds/, and every field there must be one the operator can write."""
    crd = yaml.safe_load((ROOT / "crds" / "matview.dev_materializedviews.yaml").read_text())
    declared = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(typing.get_type_hints(conditions.Status)) == set(declared)
    for field, shape in (("lastRefresh", conditions.LastRefresh), ("refreshProgress", conditions.RefreshProgress)):
        assert set(typing.get_type_hints(shape)) == set(declared[field]["properties"]), field


async def test_a_request_that_arrives_while_a_status_write_lands_still_reaches_the_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refresh-request annotation's event is validated off the loop; a status write of this process landing
    meanwhile (its refresh's progress or result, adopted as the object held) is not a newer event. Before, the
    event was dropped as if it were; when no event followed (a write that changed nothing adopts the object
    as read, and writes no new version), the request was never acted on."""
    import asyncio

    from matview.k8s import watch
    from matview.k8s.context import OperatorConfig, OperatorContext

    context = OperatorContext(config=OperatorConfig(retry_seconds=10, metrics_port=0))
    try:
        feeder = watch.WatchFeeder(context)
        validating, release = asyncio.Event(), asyncio.Event()

        async def slow_validation(body: Any) -> Any:
            validating.set()
            await release.wait()
            return view("view-00001", "scale", refresh={"interval": "1h"})

        monkeypatch.setattr(watch, "validated", slow_validation)
        requests: list[str | None] = []
        put = feeder.scheduler.put

        def spied_put(key: str, *args: Any, request: str | None = None, **kwargs: Any) -> None:
            requests.append(request)
            put(key, *args, request=request, **kwargs)

        monkeypatch.setattr(feeder.scheduler, "put", spied_put)
        annotated = decoded_view(1)
        annotated["metadata"]["annotations"] = {REFRESH_REQUESTED_ANNOTATION: "2026-12-06T21:00:00+00:00"}
        taking = asyncio.create_task(feeder.observe("MODIFIED", annotated))
        await validating.wait()
        written = copy.deepcopy(annotated)  # the status write's answer: the same object, one version on
        written["metadata"]["resourceVersion"] = str(int(annotated["metadata"]["resourceVersion"]) + 1)
        feeder._adopt(watch.view_key(annotated), written)
        release.set()
        await taking
        assert requests == ["2026-12-06T21:00:00+00:00"]

        # A newer event while one validates still wins: the older one is not put after it.
        validating.clear()
        release.clear()
        older = asyncio.create_task(feeder.observe("MODIFIED", written))
        await validating.wait()
        newer = copy.deepcopy(written)
        newer["metadata"]["resourceVersion"] = str(int(written["metadata"]["resourceVersion"]) + 1)
        newer["metadata"]["annotations"] = {REFRESH_REQUESTED_ANNOTATION: "2026-12-06T21:05:00+00:00"}
        newest = asyncio.create_task(feeder.observe("MODIFIED", newer))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(older, newest)
        assert requests[1:] == ["2026-12-06T21:05:00+00:00"]
    finally:
        context.refresher.close()
