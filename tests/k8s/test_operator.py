"""Operator behaviour through the Kubernetes API contract (kmock) and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kmock
import psycopg
import pytest

from matview.constants import GROUP, PLURAL, VERSION
from matview.k8s import kube, reconcile
from matview.k8s.conditions import Status
from matview.k8s.watch import WatchFeeder, view_key
from matview.refresh.settings import Lane
from tests.k8s.conftest import NAMESPACE, Cluster, eventually, settle

QUERY = "SELECT region, sum(amount) AS total FROM public.sales GROUP BY region"


def setup_sales(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sales (id int PRIMARY KEY, region text, amount int);"
            "INSERT INTO public.sales SELECT g, 'r' || (g % 3), g FROM generate_series(1, 100) g"
        )


def spec(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": QUERY,
        "indexes": [{"columns": ["region"], "unique": True}],
        "database": {"secretRef": {"name": "db"}},
        "deletionPolicy": "Delete",
    }
    body.update(changes)
    return body


def exists(dsn: str, name: str = "sales_by_region") -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT 1 FROM pg_matviews WHERE matviewname = %s", (name,)).fetchone() is not None


async def hourly_view_ready(cluster: Cluster, dsn: str) -> None:
    """The sales table, its Secret, and an hourly view of it, created and Ready."""
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec(refresh={"interval": "1h"}))
    await eventually(lambda: exists(dsn), "the view")
    await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready")


async def test_create_reconciles_into_postgresql_and_reports_ready(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec())
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready condition")
    assert ready["status"] == "True", ready
    assert ready["reason"] == "Reconciled"
    assert exists(dsn)
    view = await cluster.get_view("sales-by-region")
    assert view is not None
    assert view["status"]["observedGeneration"] == 1
    assert view["status"]["relation"] == "public.sales_by_region"
    assert "matview.dev/finalizer" in view["metadata"]["finalizers"]


def index_count(dsn: str, table: str = "sales_by_region") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s", (table,)).fetchone()
        return int(row[0]) if row else 0


def refresh_runs(dsn: str) -> int:
    """How many refreshes the engine recorded on the view (its marker keeps count)."""
    import json

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT obj_description('public.sales_by_region'::regclass, 'pg_class')").fetchone()
    return int(json.loads(row[0]).get("state", {}).get("runs", 0)) if row and row[0] else 0


async def test_invalid_spec_never_reaches_the_database(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view(
        "sales-by-region", spec(query="SELECT 1; DROP TABLE public.sales", refresh={"interval": "soon"})
    )
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready condition")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.query: must be exactly one statement" in ready["message"]
    assert "spec.refresh.interval" in ready["message"]
    stalled = await cluster.condition("sales-by-region", "Stalled")
    assert stalled is not None and stalled["status"] == "True"

    async def invalid_spec_events() -> list[dict[str, Any]]:
        return [e for e in await cluster.events() if e.get("reason") == "InvalidSpec"]

    await eventually(invalid_spec_events, "the Warning event (kopf posts it after the status write)")
    await settle(cluster.server)
    warnings = await invalid_spec_events()
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM public.sales").fetchone() == (100,)
    assert not exists(dsn)
    await cluster.delete_view("sales-by-region")  # an invalid resource never keeps its finalizer
    await eventually(lambda: _gone(cluster), "the invalid resource to go away")


async def test_a_hostile_resource_is_reported_and_its_neighbours_keep_working(
    cluster: Cluster, operator: Any, dsn: str
) -> None:
    # 30,000 chained terms (60 KB, within the CRD's maxLength) once killed the whole process in the parser.
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("hostile", spec(name="hostile", query="SELECT " + "1+" * 30_000 + "1 AS x"))
    await cluster.create_view("sales-by-region", spec())
    hostile = await eventually(lambda: cluster.condition("hostile", "Ready"), "the hostile one reported")
    assert (hostile["status"], hostile["reason"]) == ("False", "InvalidSpec")
    assert "spec.query: nests" in hostile["message"]

    async def invalid_spec_event() -> list[dict[str, Any]]:
        return [e for e in await cluster.events() if e.get("reason") == "InvalidSpec"]

    await eventually(invalid_spec_event, "a Warning event (kopf posts it after the status write)")
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "the neighbour Ready")
    assert ready["status"] == "True", ready
    assert exists(dsn) and not exists(dsn, "hostile")
    await settle(cluster.server)  # (that an invalid resource lets go of its finalizer is tested above)


async def test_missing_secret_is_reported_and_clears_once_created(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.create_view("sales-by-region", spec())
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready condition")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    reconciling = await cluster.condition("sales-by-region", "Reconciling")
    assert reconciling is not None and reconciling["status"] == "True"
    await cluster.put_secret("db", {"uri": dsn})

    async def ready_now() -> bool:
        condition = await cluster.condition("sales-by-region", "Ready")
        return condition is not None and condition["status"] == "True"

    await eventually(ready_now, "Ready after the Secret appears")
    assert exists(dsn)


async def test_unreachable_database_never_leaks_the_password(cluster: Cluster, operator: Any, dsn: str) -> None:
    await cluster.put_secret("db", {"uri": "postgresql://app:S3cr3t-pw@127.0.0.1:1/nowhere?connect_timeout=1"})
    await cluster.create_view("sales-by-region", spec())
    ready = await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready condition", seconds=60)
    assert (ready["status"], ready["reason"]) == ("False", "DatabaseUnreachable")
    assert "127.0.0.1:1/nowhere" in ready["message"]

    async def unreachable_events() -> list[dict[str, Any]]:
        return [e for e in await cluster.events() if e.get("reason") == "DatabaseUnreachable"]

    await eventually(unreachable_events, "the Warning event")
    view = await cluster.get_view("sales-by-region")
    events = await cluster.events()
    assert "S3cr3t-pw" not in repr(view) + repr(events)


async def test_spec_edit_replans_and_swaps(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec())
    await eventually(lambda: exists(dsn), "the view")
    await cluster.edit_spec(
        "sales-by-region",
        {
            "query": QUERY.replace("sum(amount)", "sum(amount) * 2"),
            "indexes": [{"columns": ["region"], "unique": True}, {"columns": ["total"]}],
        },
    )

    def doubled() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT sum(total) FROM public.sales_by_region").fetchone()
            return row == (2 * 5050,)

    await eventually(doubled, "the swapped view with the new query")
    assert index_count(dsn) == 2

    async def observed() -> bool:
        view = await cluster.get_view("sales-by-region")
        return bool(view and view["status"].get("observedGeneration") == 2)

    await eventually(observed, "observedGeneration 2")


async def test_interval_edit_is_picked_up_and_the_annotation_refreshes_once(
    cluster: Cluster, operator: Any, dsn: str
) -> None:
    await hourly_view_ready(cluster, dsn)
    # kmock keeps the resourceVersion a writer sends instead of making a new one, so kopf cannot tell the
    # events of the status writes made while its create handler ran from new ones, and handles the creation
    # again for each. Let that end first: an annotation landing amid it can be read from a stale body.
    await settle(cluster.server, quiet=1.0)
    assert refresh_runs(dsn) == 0  # built a moment ago: the hourly refresh is not due

    await cluster.patch_view(
        "sales-by-region", {"metadata": {"annotations": {"matview.dev/refresh-requested-at": "2026-11-27T10:00:00Z"}}}
    )
    await eventually(lambda: refresh_runs(dsn) == 1, "one refresh for the annotation")

    async def recorded() -> dict[str, Any] | None:
        view = await cluster.get_view("sales-by-region")
        status = (view or {}).get("status") or {}
        return status if status.get("lastHandledRefreshRequest") == "2026-11-27T10:00:00Z" else None

    status = await eventually(recorded, "the handled request in status")
    assert status["lastRefresh"]["result"] == "success"
    assert status["lastRefresh"]["mode"] == "Concurrent"
    refreshed = await cluster.condition("sales-by-region", "Refreshed")
    assert refreshed is not None and refreshed["status"] == "True"
    await settle(cluster.server, quiet=1.0)
    assert refresh_runs(dsn) == 1  # the same value never triggers again

    await cluster.edit_spec("sales-by-region", {"refresh": {"interval": "1s"}})
    await eventually(lambda: refresh_runs(dsn) >= 3, "refreshes at the new interval")


async def test_a_creation_handled_again_is_not_applied_again(
    cluster: Cluster, operator: Any, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf handles a creation again when it has not seen its own annotation write come back within its
    consistency wait (at 3,000 views the watch lagged that much: nearly every view was created twice). The
    view is Ready for its generation: the handler must not apply it again (catalog reads, status write)."""
    applies = handled = 0
    outcome, apply_spec = reconcile._outcome, reconcile.apply_spec

    async def counted(ctx: Any, body: Any, logger: Any, lane: Lane = "apply") -> Any:
        nonlocal applies
        applies += lane == "apply"
        return await outcome(ctx, body, logger, lane)

    async def counted_handler(ctx: Any, body: Any, logger: Any) -> Any:
        nonlocal handled
        handled += 1
        return await apply_spec(ctx, body, logger)

    monkeypatch.setattr(reconcile, "_outcome", counted)
    monkeypatch.setattr(reconcile, "apply_spec", counted_handler)
    await hourly_view_ready(cluster, dsn)
    await settle(cluster.server, quiet=1.0)
    applied, handled_before = applies, handled
    assert applied >= 1

    diffbase = "matview.dev/last-handled-configuration"

    async def annotated() -> bool:
        view = await cluster.get_view("sales-by-region")
        return diffbase in ((view or {}).get("metadata") or {}).get("annotations", {})

    assert await annotated()
    # To kopf the view is new again. Whether the annotation is read back absent is a race with kopf's own
    # rewrite of it; the handler's call count is not.
    await cluster.patch_view("sales-by-region", {"metadata": {"annotations": {diffbase: None}}})
    await eventually(lambda: handled > handled_before, "kopf's creation handling of the view, once more")
    await eventually(annotated, "kopf's annotation, written back")
    await settle(cluster.server, quiet=1.0)
    assert applies == applied, "a generation already applied was applied again"

    await cluster.edit_spec(
        "sales-by-region", {"indexes": [{"columns": ["region"], "unique": True}, {"columns": ["total"]}]}
    )
    await eventually(lambda: index_count(dsn) == 2, "a new generation, applied")
    assert applies > applied


async def test_a_view_is_refreshed_before_the_watch_brings_back_its_ready_status(
    cluster: Cluster, operator: Any, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a mass creation kopf's watch ran tens of seconds behind, and the scheduler learned that a view was
    Ready (so refreshable) only from it: first refreshes started that late. The handler that makes it Ready
    tells the scheduler itself. Here the watch brings the feeder the view's first event and nothing after it."""
    seen: set[str] = set()
    observe = WatchFeeder.observe

    async def first_event_only(self: WatchFeeder, event_type: str | None, body: Any) -> None:
        if view_key(body) not in seen:
            seen.add(view_key(body))
            await observe(self, event_type, body)

    monkeypatch.setattr(WatchFeeder, "observe", first_event_only)
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec(refresh={"interval": "1s"}))
    await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready")
    await eventually(lambda: refresh_runs(dsn) >= 2, "refreshes every second")


async def test_deletion_policies(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view("sales-by-region", spec(deletionPolicy="Retain"))
    await eventually(lambda: exists(dsn), "the view")
    await cluster.delete_view("sales-by-region")
    await eventually(lambda: _gone(cluster), "the finalizer released")
    assert exists(dsn)

    await cluster.create_view("totals", spec(name="sales_totals", deletionPolicy="Delete"))
    await eventually(lambda: exists(dsn, "sales_totals"), "the second view")
    await cluster.delete_view("totals")

    async def released() -> bool:
        return await cluster.get_view("totals") is None

    await eventually(released, "the finalizer released")
    assert not exists(dsn, "sales_totals")


async def _gone(cluster: Cluster) -> bool:
    return await cluster.get_view("sales-by-region") is None


async def test_a_100_kib_query_works_and_annotations_stay_small(cluster: Cluster, operator: Any, dsn: str) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    padding = " ".join(f"/* {i:06d} padding to make a large query */" for i in range(2500))
    big = f"SELECT region, sum(amount) AS total {padding} FROM public.sales GROUP BY region"
    assert len(big) > 100 * 1024
    await cluster.create_view("sales-by-region", spec(query=big))
    await eventually(lambda: exists(dsn), "the view")

    async def handled() -> dict[str, str] | None:
        """The annotations once kopf has recorded the handled configuration (it writes it after the create
        handler returns, so after the view exists in the database)."""
        view = await cluster.get_view("sales-by-region")
        annotations: dict[str, str] = ((view or {}).get("metadata") or {}).get("annotations") or {}
        return annotations if "matview.dev/last-handled-configuration" in annotations else None

    annotations = await eventually(handled, "kopf's record of the handled configuration")
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 4096
    assert "sha256:" in annotations["matview.dev/last-handled-configuration"]


async def test_the_scheduler_repairs_drift_without_rewriting_an_unchanged_status(
    cluster: Cluster, operator: Any, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drift checks (every 2 s in these tests) restore a dropped index; when nothing changed they write nothing."""
    checks = count_calls(monkeypatch, "apply")
    await hourly_view_ready(cluster, dsn)

    def indexes() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'sales_by_region'").fetchone()
        return int(row[0]) if row else 0

    async def no_change_needed() -> bool:
        ready = await cluster.condition("sales-by-region", "Ready")
        return ready is not None and "no change needed" in ready["message"]

    await eventually(no_change_needed, "a drift check that found nothing to do")
    await settle(cluster.server, quiet=1.0)
    patches_before = sum(1 for r in cluster.server if str(r.method).upper().endswith("PATCH") and r.subresource)
    checked = checks()
    await eventually(lambda: checks() >= checked + 2, "two more drift checks (the scheduler's loop is alive)")
    patches_after = sum(1 for r in cluster.server if str(r.method).upper().endswith("PATCH") and r.subresource)
    assert patches_after == patches_before, "an unchanged status was written again"

    assert indexes() == 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'sales_by_region'").fetchone()
        assert name is not None
        conn.execute(f'DROP INDEX public."{name[0]}"')
    assert indexes() == 0
    await eventually(lambda: indexes() == 1, "the dropped index restored by a drift check")


async def test_an_incremental_view_keeps_its_target_lag_and_reports_it(
    cluster: Cluster, operator: Any, dsn: str
) -> None:
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view(
        "sales-by-region",
        spec(
            storage="Table",
            incremental={
                "keyColumns": ["region"],
                "sources": [{"table": "public.sales", "columns": ["region"]}],
                "fullRebuildRatio": 1,
            },
            refresh={"targetLag": "2s"},
        ),
    )
    await eventually(lambda: cluster.condition("sales-by-region", "Ready"), "Ready")

    def stored_total(region: str) -> int | None:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT total FROM public.sales_by_region WHERE region = %s", (region,)).fetchone()
            return int(row[0]) if row else None

    before = stored_total("r1")
    assert before is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.sales SET amount = amount + 1000 WHERE id = 1")  # region r1
    await eventually(lambda: stored_total("r1") == before + 1000, "the change applied within the target lag", 20)

    async def fresh() -> dict[str, Any] | None:
        found = await cluster.condition("sales-by-region", "Fresh")
        return found if found and found["status"] == "True" else None

    assert (await eventually(fresh, "Fresh True"))["reason"] == "WithinTargetLag"

    async def recorded() -> dict[str, Any] | None:
        """The applying refresh's own status write (a look's, which only sets Fresh, can land before it)."""
        body = await cluster.get_view("sales-by-region")
        last = ((body or {}).get("status") or {}).get("lastRefresh")
        return last if last and last["result"] == "success" else None

    last = await eventually(recorded, "the refresh that applied the change, in status")
    assert last["mode"] in ("Incremental", "Swap"), last
    await cluster.delete_view("sales-by-region")
    await eventually(lambda: not exists_table(dsn), "the table dropped (deletionPolicy Delete)")
    with psycopg.connect(dsn) as conn:
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.sales'::regclass").fetchone()
    assert triggers == (0,)


def exists_table(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('public.sales_by_region') IS NOT NULL").fetchone() == (True,)


async def test_target_lag_looks_do_not_rewrite_the_status(
    cluster: Cluster, operator: Any, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks = count_calls(monkeypatch, "refresh")
    setup_sales(dsn)
    await cluster.put_secret("db", {"uri": dsn})
    incremental = {"keyColumns": ["region"], "sources": [{"table": "public.sales", "columns": ["region"]}]}
    await cluster.create_view(
        "sales-by-region",
        spec(storage="Table", incremental=incremental, refresh={"targetLag": "1s"}, deletionPolicy="Retain"),
    )
    await eventually(lambda: cluster.condition("sales-by-region", "Fresh"), "the first look")

    def status_patches() -> int:
        return sum(1 for r in cluster.server if str(r.method).upper().endswith("PATCH") and r.subresource)

    await settle(cluster.server, quiet=1.0)
    before, looked = status_patches(), looks()
    await eventually(lambda: looks() >= looked + 4, "four more looks (the scheduler's loop is alive)")
    assert status_patches() == before, "a look that found nothing wrote the status"

    # Retain keeps the rows, and still takes the capture off the source table.
    await cluster.delete_view("sales-by-region")
    await eventually(lambda: capture_triggers(dsn) == 0, "the capture triggers removed")
    assert exists_table(dsn)


def count_calls(monkeypatch: pytest.MonkeyPatch, method: str) -> Callable[[], int]:
    """Count the scheduler's finished looks (the feeder's ``refresh``) or drift checks (its ``apply``), so that
    a test waits on them instead of the clock: a loop that died makes the wait fail rather than pass."""
    finished = 0
    original = getattr(WatchFeeder, method)

    async def counted(self: WatchFeeder, *args: Any, **kwargs: Any) -> Any:
        nonlocal finished
        try:
            return await original(self, *args, **kwargs)
        finally:
            finished += 1

    monkeypatch.setattr(WatchFeeder, method, counted)
    return lambda: finished


def capture_triggers(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.sales'::regclass").fetchone()
    return int(row[0]) if row else 0


async def test_a_status_write_answered_429_or_503_is_retried(cluster: Cluster) -> None:
    """The apiserver rate-limits (429, with Retry-After) or fails for a moment (503): the status write waits
    and is retried, instead of being dropped (a dropped write once left a view without its build time, so it
    was refreshed again at once)."""
    await cluster.create_view("sales-by-region", spec())
    status = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}/sales-by-region/status"
    refusals = [kmock.Response(status=429, headers={"Retry-After": "0.2"}), kmock.Response(status=503)]
    refused: list[int] = []

    def refuse_twice() -> kmock.Response | StopIteration:
        if not refusals:
            return StopIteration()  # from now on the emulator answers
        refused.append(refusals[0].status or 0)
        return refusals.pop(0)

    cluster.server[f"patch {status}"].override << refuse_twice

    def mark(current: Status) -> Status:
        return {**current, "relation": "public.sales_by_region"}

    written = await kube.patch_status(NAMESPACE, "sales-by-region", mark)
    assert refused == [429, 503]
    assert written is not None and written["status"]["relation"] == "public.sales_by_region"
    stored = await cluster.get_view("sales-by-region")
    assert stored is not None and stored["status"]["relation"] == "public.sales_by_region"


async def test_a_rebuild_a_partition_at_a_time_shows_its_progress_in_status_until_it_ends(
    cluster: Cluster, operator: Any, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.events (id int PRIMARY KEY, at date NOT NULL, v int);"
            "INSERT INTO public.events SELECT g, date '2026-01-05' + (g % 6) * 7, g FROM generate_series(1, 60) g"
        )
    await cluster.put_secret("db", {"uri": dsn})
    await cluster.create_view(
        "weekly-events",
        {
            "query": "SELECT id, at, v FROM public.events",
            "storage": "Table",
            "indexes": [{"columns": ["id", "at"], "unique": True}],
            "partitioning": {
                "column": "at",
                "by": "Range",
                "period": "Week",
                "sources": [{"table": "public.events", "column": "at"}],
            },
            "refresh": {"interval": "1h"},
            "database": {"secretRef": {"name": "db"}},
            "deletionPolicy": "Delete",
        },
    )
    await eventually(lambda: cluster.condition("weekly-events", "Ready"), "Ready")
    await settle(cluster.server, quiet=1.0)

    async def status() -> dict[str, Any]:
        return ((await cluster.get_view("weekly-events")) or {}).get("status") or {}

    async def in_progress() -> dict[str, Any] | None:
        progress: dict[str, Any] | None = (await status()).get("refreshProgress")
        return progress

    # The oldest week is rebuilt last: a long read of it holds the rebuild before its swap, the others done.
    with psycopg.connect(dsn) as reader:
        reader.execute("LOCK TABLE public.weekly_events_p20260105 IN ACCESS SHARE MODE")
        await cluster.patch_view(
            "weekly-events", {"metadata": {"annotations": {"matview.dev/refresh-requested-at": "2026-12-04T10:00:00Z"}}}
        )
        progress = await eventually(in_progress, "the rebuild's progress in status")
        assert 1 <= progress["partitionsRebuilt"] < progress["partitionsToRebuild"], progress
        assert progress["lastPartition"].startswith("weekly_events_p"), progress
        assert "partition(s) one at a time" in progress["message"], progress
    # The read ends, the rebuild goes on, and its end takes the progress away.

    async def ended() -> dict[str, Any] | None:
        found = await status()
        return found if found.get("lastHandledRefreshRequest") == "2026-12-04T10:00:00Z" else None

    final = await eventually(ended, "the refresh's result in status")
    assert final["lastRefresh"]["result"] == "success", final
    assert "refreshProgress" not in final, final
    assert f"rebuilt {progress['partitionsToRebuild']} partition(s) one at a time" in final["lastRefresh"]["message"]
