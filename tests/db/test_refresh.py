"""The refresh engine against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from matview import refresh as refresh_module
from matview.api.spec import MaterializedView
from matview.embedded.localpg import free_port
from matview.observe.metrics import RefreshMetrics
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import Inspection, RefreshResult, refresh, schedule
from matview.refresh import facts as refresh_facts
from matview.refresh.facts import dependency_order
from matview.refresh.policy import SWAP_ADVANTAGE
from matview.refresh.refresher import Refresher
from matview.refresh.settings import Lane, RunnerSettings
from tests.db.catalog_helpers import relations
from tests.helpers import document, to_yaml, view

ROOT = Path(__file__).resolve().parents[2]

SETUP = """
CREATE SCHEMA ops;
CREATE TABLE ops.ctl (slow_seconds float NOT NULL);
INSERT INTO ops.ctl VALUES (0);
-- Sleeps for ops.ctl.slow_seconds, so a test can make the next refresh slow without changing the query.
CREATE FUNCTION ops.pause() RETURNS int LANGUAGE sql VOLATILE AS
  'SELECT 1 FROM (SELECT pg_sleep(slow_seconds) FROM ops.ctl) s';
CREATE TABLE ops.events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL);
INSERT INTO ops.events SELECT g, 'k' || (g % 7), g FROM generate_series(1, 500) g;
CREATE VIEW ops.events_v AS SELECT id, kind, amount FROM ops.events;
"""

QUERY = "SELECT kind, count(*) AS n, sum(amount) AS total FROM ops.events_v, (SELECT ops.pause() AS p) s GROUP BY kind"


@pytest.fixture
def db(conn: Connection) -> Connection:
    conn.execute(SETUP)
    return conn


def mv(resource: str = "totals", unique: bool = True, **spec: Any) -> MaterializedView:
    body: dict[str, Any] = {"schema": "ops", "query": QUERY, "indexes": [{"columns": ["kind"], "unique": unique}]}
    body.update(spec)
    return view(resource, "ops", **body)


def total(conn: Connection, name: str = "totals") -> int:
    row = conn.execute(f"SELECT sum(total) FROM ops.{name}").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def flush_stats(conn: Connection) -> None:
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")


def test_auto_starts_concurrent_measures_swap_then_keeps_the_cheaper(db: Connection) -> None:
    v = mv()
    engine.apply(db, v)
    db.execute("INSERT INTO ops.events VALUES (1000, 'k1', 1000)")
    first = refresh(db, v)
    assert (first.result, first.mode) == ("success", "Concurrent")
    assert total(db) == 125250 + 1000
    second = refresh(db, v)
    assert (second.result, second.mode) == ("success", "Swap")
    assert "measuring Swap" in second.reason
    measured = refresh_module.read_state(db, v).durations
    third = refresh(db, v)
    # Swap only when clearly faster: a near-tie goes to Concurrent, which costs the database less.
    expected = "Swap" if measured["Swap"] < measured["Concurrent"] * SWAP_ADVANTAGE else "Concurrent"
    assert (third.result, third.mode) == ("success", expected), (third, measured)
    assert "cheaper" in third.reason or "not enough faster" in third.reason
    state = refresh_module.read_state(db, v)
    assert set(state.durations) == {"Concurrent", "Swap"}
    assert state.runs == 3
    assert engine.plan(db, v).empty  # refreshing never makes the spec drift


def test_auto_without_unique_index_swaps_and_readers_keep_reading(db: Connection, dsn: str) -> None:
    v = mv(unique=False)
    engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 1.5; INSERT INTO ops.events VALUES (1000, 'k1', 1000)")
    reads: list[float] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def reader() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                try:
                    c.execute("SELECT sum(total) FROM ops.totals").fetchone()
                    reads.append(time.monotonic())
                except psycopg.Error as exc:
                    errors.append(exc)
                time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.monotonic()
    try:
        result = refresh(db, v)
    finally:
        finished = time.monotonic()
        stop.set()
        thread.join()
    assert (result.result, result.mode) == ("success", "Swap")
    assert "CONCURRENTLY is impossible" in result.reason
    assert errors == []
    assert len([t for t in reads if started < t < finished]) > 10  # served throughout the 1.5 s build
    assert total(db) == 125250 + 1000


def test_plain_refresh_blocks_readers_concurrent_does_not(db: Connection, dsn: str) -> None:
    v = mv()
    engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 1.5")

    def reader_waited_on_a_lock(mode: str) -> bool:
        waited = threading.Event()
        done = threading.Event()

        def watch() -> None:
            with psycopg.connect(dsn, autocommit=True) as watcher, psycopg.connect(dsn, autocommit=True) as reader:
                # The reader comes once the REFRESH holds its lock on the view (Full: ACCESS EXCLUSIVE; Concurrent:
                # EXCLUSIVE, which readers pass).
                deadline = time.monotonic() + 60
                while watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'ops.totals'::regclass AND granted "
                    "AND mode IN ('AccessExclusiveLock', 'ExclusiveLock') AND pid <> pg_backend_pid()"
                ).fetchone() == (0,):
                    assert time.monotonic() < deadline, "the REFRESH never ran"
                    time.sleep(0.01)
                thread = threading.Thread(target=lambda: reader.execute("SELECT count(*) FROM ops.totals"))
                thread.start()
                while thread.is_alive():
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query = 'SELECT count(*) FROM ops.totals'"
                    ).fetchone()
                    if row and row[0]:
                        waited.set()
                    time.sleep(0.05)
                done.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert refresh(db, v, mode).result == "success"
        watcher.join()
        return waited.is_set()

    assert reader_waited_on_a_lock("Full") is True
    assert reader_waited_on_a_lock("Concurrent") is False


def test_unpopulated_view_gets_plain_refresh_in_auto_and_concurrent_fails_clearly(db: Connection) -> None:
    v = mv()
    engine.apply(db, v)
    db.execute("REFRESH MATERIALIZED VIEW ops.totals WITH NO DATA")
    failed = refresh(db, v, "Concurrent")
    assert failed.result == "failure" and "not populated" in failed.message
    result = refresh(db, v)
    assert (result.result, result.mode) == ("success", "Full")
    assert "not populated" in result.reason
    assert result.populated is True


def test_concurrent_requested_without_unique_index_fails_and_changes_nothing(db: Connection) -> None:
    v = mv(unique=False)
    engine.apply(db, v)
    before = relations(db)
    result = refresh(db, v, "Concurrent")
    assert result.result == "failure"
    assert "no unique index" in result.message
    assert relations(db) == before


def test_concurrent_failure_falls_back_with_the_reason(db: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    v = mv(unique=False)
    engine.apply(db, v)
    real_inspected = refresh_facts.inspected

    def stale_inspection(conn: Connection, spec: MaterializedView, row: tuple[Any, ...] | None) -> Inspection:
        # As if the unique index was dropped by hand between inspection and refresh.
        found = real_inspected(conn, spec, row)
        return Inspection(**{**found.__dict__, "concurrent_possible": True})

    monkeypatch.setattr(refresh_facts, "inspected", stale_inspection)
    result = refresh(db, v)
    assert result.result == "success"
    assert result.fallback_from == "Concurrent"
    assert result.mode == "Swap"
    assert "cannot refresh materialized view" in result.reason


@pytest.mark.parametrize("mode", ["Concurrent", "Full", "Swap"])
def test_timeout_keeps_the_old_data_and_counts_timeout(db: Connection, mode: str) -> None:
    v = mv(refresh={"timeout": "1s"})
    engine.apply(db, v)
    before = total(db)
    db.execute("UPDATE ops.ctl SET slow_seconds = 3; INSERT INTO ops.events VALUES (1000, 'k1', 1000)")
    result = refresh(db, v, mode)
    assert result.result == "failure"
    assert result.failure_reason == "timeout"
    assert total(db) == before
    assert not any(name.endswith(("_mv_staging", "_mv_retired")) for _, name, _ in relations(db))


def test_two_processes_racing_on_one_view_run_exactly_one_refresh(db: Connection, dsn: str, tmp_path: Path) -> None:
    v = mv()
    engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 2")
    spec = tmp_path / "mv.yaml"
    spec.write_text(
        to_yaml(document("totals", "ops", schema="ops", query=QUERY, indexes=[{"columns": ["kind"], "unique": True}]))
    )
    command = [
        sys.executable,
        "-m",
        "matview.cli",
        "refresh",
        "--json",
        "--mode",
        "Concurrent",
        "--dsn",
        dsn,
        str(spec),
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)
    ]
    outcomes = sorted(json.loads(p.communicate(timeout=120)[0])[0]["result"] for p in processes)
    assert outcomes == ["skipped", "success"]


async def refresh_all_at_once(
    refresher: Refresher, dsn: str, views: list[MaterializedView]
) -> tuple[list[RefreshResult], int]:
    """Every view refreshed (Full) at once through the refresher, while a watcher samples pg_stat_activity:
    the results and the most REFRESH statements it saw running together."""
    peak = 0
    running = True

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(dsn, autocommit=True) as watcher:
            while running:
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%%REFRESH MATERIALIZED VIEW%%' AND pid <> pg_backend_pid()"
                ).fetchone()
                peak = max(peak, int(row[0]) if row else 0)
                time.sleep(0.05)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        results = await asyncio.gather(*(refresher.refresh(dsn, v, "Full") for v in views))
    finally:
        running = False
        watcher.join()
    return results, peak


async def test_per_database_cap_is_honoured(db: Connection, dsn: str) -> None:
    views = [mv(f"totals-{i}") for i in range(5)]
    for v in views:
        engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 0.8")
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=2))
    try:
        results, peak = await refresh_all_at_once(refresher, dsn, views)
    finally:
        refresher.close()
    assert [r.result for r in results] == ["success"] * 5
    assert peak == 2


def test_only_if_changed_skips_untouched_and_sees_every_kind_of_write(db: Connection, dsn: str) -> None:
    v = mv(refresh={"onlyIfChanged": True, "interval": "1m"})
    engine.apply(db, v)
    assert refresh(db, v).result == "success"
    skipped = refresh(db, v)
    assert skipped.result == "skipped" and "onlyIfChanged" in skipped.reason
    writes = [
        "INSERT INTO ops.events VALUES (2000, 'k2', 5)",
        "UPDATE ops.events SET amount = amount + 1 WHERE id = 1",
        "DELETE FROM ops.events WHERE id = 2",
        "TRUNCATE ops.events",
    ]
    with psycopg.connect(dsn, autocommit=True) as writer:
        for write in writes:
            writer.execute(write)
            flush_stats(writer)
            assert refresh(db, v).result == "success", write
            assert refresh(db, v).result == "skipped", write
    assert total(db) == 0


@pytest.mark.parametrize("storage", ["MaterializedView", "Table"])
def test_only_if_changed_switched_on_later_refreshes_once_then_skips(db: Connection, dsn: str, storage: str) -> None:
    """Without onlyIfChanged a refresh reads no fingerprints of the sources and records none; switched on, the
    first refresh cannot know that nothing changed, so it runs, and the next skips until a write."""
    mode = "Full" if storage == "MaterializedView" else "Swap"  # a table has no REFRESH
    plain = mv(storage=storage, refresh={"mode": mode})
    engine.apply(db, plain)
    for _ in range(2):
        assert refresh(db, plain).result == "success"
    watching = mv(storage=storage, refresh={"mode": mode, "onlyIfChanged": True})
    assert refresh(db, watching).result == "success", "nothing recorded what the sources looked like"
    assert refresh(db, watching).result == "skipped"
    with psycopg.connect(dsn, autocommit=True) as writer:
        writer.execute("INSERT INTO ops.events VALUES (2000, 'k2', 5)")
        flush_stats(writer)
    assert refresh(db, watching).result == "success"
    assert refresh(db, watching).result == "skipped"


def test_upstream_refresh_counts_as_a_change_and_order_follows_dependencies(db: Connection) -> None:
    upstream = mv("upstream")
    downstream = view(
        "downstream",
        "ops",
        schema="ops",
        query="SELECT kind, total FROM ops.upstream",
        indexes=[{"columns": ["kind"], "unique": True}],
        refresh={"onlyIfChanged": True},
    )
    engine.apply(db, upstream)
    engine.apply(db, downstream)
    assert [v.name for v in dependency_order(db, [downstream, upstream])] == ["upstream", "downstream"]
    assert refresh(db, downstream).result == "success"
    assert refresh(db, downstream).result == "skipped"
    db.execute("INSERT INTO ops.events VALUES (3000, 'k3', 7)")
    assert refresh(db, upstream).result == "success"
    assert refresh(db, downstream).result == "success"
    assert total(db, "downstream") == total(db, "upstream")


def test_metrics_page_after_a_success_and_a_failure(db: Connection) -> None:
    v = mv(refresh={"interval": "10m", "timeout": "1s"})
    engine.apply(db, v)
    metrics = RefreshMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    metrics.track(v, schedule.expected_period_seconds(v, dt.datetime.now(dt.UTC)))
    ok = refresh(db, v, "Concurrent")
    metrics.record("ops", "totals", ok)
    db.execute("UPDATE ops.ctl SET slow_seconds = 3")
    failed = refresh(db, v, "Concurrent")
    metrics.record("ops", "totals", failed)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.labels.get("name") == "totals"
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"namespace": "ops", "name": "totals", **labels}.items())))]

    assert value("matview_refreshes_total", mode="Concurrent", result="success") == 1
    assert value("matview_refreshes_total", mode="Concurrent", result="failure") == 1
    assert value("matview_refresh_failures_total", reason="timeout") == 1
    assert value("matview_refresh_failures_total", reason="lock_timeout") == 0
    assert value("matview_refresh_duration_seconds_count", mode="Concurrent") == 2
    assert value("matview_refresh_duration_seconds_bucket", mode="Concurrent", le="7200.0") == 2
    assert value("matview_last_refresh_success_timestamp_seconds") == pytest.approx(ok.completed_at.timestamp())
    assert value("matview_last_refresh_duration_seconds") == pytest.approx(failed.duration_seconds)
    assert value("matview_refresh_interval_seconds") == 600
    assert value("matview_refresh_timeout_seconds") == 1
    assert value("matview_refresh_in_progress") == 0
    assert value("matview_populated") == 1
    assert value("matview_rows") == 7
    assert value("matview_size_bytes", component="table") > 0
    assert value("matview_size_bytes", component="indexes") > 0
    metrics.forget("ops", "totals")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'name="totals"' not in body


async def wait_for_statement(db: Connection, pattern: str, task: asyncio.Task[Any], seconds: float = 60) -> None:
    """Until another session runs a statement LIKE pattern; fails at once if the task ended first."""
    deadline = time.monotonic() + seconds
    while True:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
            (pattern,),
        ).fetchone()
        if row and row[0]:
            return
        assert not task.done(), f"the task ended before its statement ran: {task}"
        assert time.monotonic() < deadline, f"no statement like {pattern!r} ran within {seconds} s"
        await asyncio.sleep(0.02)


async def test_cancelling_a_refresh_cancels_it_in_the_database(db: Connection, dsn: str) -> None:
    v = mv()
    engine.apply(db, v)
    before = total(db)
    db.execute("UPDATE ops.ctl SET slow_seconds = 30; INSERT INTO ops.events VALUES (1000, 'k1', 1000)")
    refresher = Refresher(RefreshMetrics())
    task = asyncio.create_task(refresher.refresh(dsn, v, "Concurrent"))
    await wait_for_statement(
        db, "%REFRESH MATERIALIZED VIEW%", task
    )  # cancel it in the server, not before it got there
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    refresher.close()
    # Uncancelled, the statement would still be running for another 29 seconds.
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE query LIKE '%%REFRESH MATERIALIZED VIEW%%' AND pid <> pg_backend_pid()"
    ).fetchone()
    assert row == (0,)
    assert total(db) == before


async def test_a_lane_grows_to_its_ceiling_while_refreshes_wait_and_no_further(db: Connection, dsn: str) -> None:
    """Five slow refreshes due at once on a lane of base 2 and ceiling 3: once one has waited, a third runs
    beside the first two, and never a fourth."""
    views = [mv(f"grow-{i}") for i in range(5)]
    for v in views:
        engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 0.8")
    settings = RunnerSettings(
        max_concurrent_per_database=3, base_concurrent_per_database=2, lane_grow_after_seconds=0.2
    )
    refresher = Refresher(RefreshMetrics(), settings)
    try:
        results, peak = await refresh_all_at_once(refresher, dsn, views)
        lanes = refresher.refresh_lanes()
    finally:
        refresher.close()
    assert [r.result for r in results] == ["success"] * 5
    assert peak == 3
    assert lanes == (3, 3), "open slots and ceiling"


async def test_two_slow_views_do_not_starve_a_third_and_its_wait_shows_in_the_queue(db: Connection, dsn: str) -> None:
    """Two always-due slow views and one fast view on two lanes: the fast one still gets a lane each time a slow
    one ends (the lanes are handed out in arrival order), and while it waits the queue depth says so."""
    slow = [mv("slow-a"), mv("slow-b")]
    fast = mv("fast", query="SELECT kind, count(*) AS n FROM ops.events GROUP BY kind")
    for v in (*slow, fast):
        engine.apply(db, v)
    db.execute("UPDATE ops.ctl SET slow_seconds = 0.5")
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_per_database=2))
    done: dict[str, int] = {v.resource_name: 0 for v in (*slow, fast)}
    waiting_seen: list[int] = []
    stop = asyncio.Event()

    async def always_due(v: MaterializedView) -> None:  # as the scheduler runs a view whose interval has passed
        while not stop.is_set():
            result = await refresher.refresh(dsn, v, "Full")
            assert result.result == "success", result
            done[v.resource_name] += 1

    async def watch_queue() -> None:
        while not stop.is_set():
            waiting_seen.append(refresher.waiting())
            await asyncio.sleep(0.05)

    loops = [asyncio.create_task(always_due(v)) for v in (*slow, fast)]
    watcher = asyncio.create_task(watch_queue())
    try:
        async with asyncio.timeout(60):  # bounds a hang only: the loop ends when the fast view refreshed 4 times
            while done["fast"] < 4:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*loops, watcher, return_exceptions=True)
        refresher.close()
    assert done["slow-a"] >= 1 and done["slow-b"] >= 1, done
    assert max(waiting_seen) >= 1, "the fast view waited for a lane, and the queue depth showed it"


async def test_work_cancelled_while_queued_never_runs(dsn: str) -> None:
    """A drift check cancelled while it waited for a thread (its view was deleted meanwhile) must not run once
    a thread frees up: it re-created the view after the deletion had dropped it."""
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_drift_checks=1))
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def long_check(conn: Connection) -> None:
        started.set()
        release.wait(60)

    busy = asyncio.create_task(refresher.run_sync(dsn, long_check, "check"))  # the lane's only thread
    try:
        await asyncio.to_thread(started.wait, 60)
        queued = asyncio.create_task(refresher.run_sync(dsn, lambda conn: ran.append("queued"), "check"))
        await asyncio.sleep(0)  # waiting for the lane's only slot, behind the busy work
        queued.cancel()
        # cancel() queues the task's wake-up on the loop; one turn delivers the CancelledError, which withdraws
        # the waiting work. Releasing the busy work before that turn lets the queued work start in its thread
        # first (a CI failure: ['queued', 'after']), a race of the test, not of the refresher: work already
        # started is cancelled on the server, which this lambda never reaches.
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await busy
        await refresher.run_sync(dsn, lambda conn: ran.append("after"), "check")  # the thread is free again
        assert ran == ["after"]
    finally:
        release.set()
        await asyncio.gather(busy, return_exceptions=True)
        refresher.close()


async def test_work_cancelled_while_waiting_for_a_connection_does_not_wait_out_the_pool() -> None:
    """The database is down: the work waits for a pooled connection (up to the pool's 10 s). Cancelled (a
    SIGTERM, a deleted view), it ends at once and never runs; closing the refresher ends the thread's wait. It
    used to wait the pool's timeout out: `matview run` took 8.5 s to exit on SIGTERM with its database down."""
    refresher = Refresher(RefreshMetrics())
    down = f"host=127.0.0.1 port={free_port()} dbname=none user=none connect_timeout=2"
    ran: list[str] = []
    pool = refresher.pool(down, "apply")

    task = asyncio.create_task(refresher.run_sync(down, lambda conn: ran.append("ran"), "apply"))
    try:
        async with asyncio.timeout(30):  # bounds a hang only: it waits for the thread to ask the pool
            while not pool.get_stats().get("requests_waiting"):
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The pool counts a wait that timed out as a request error: none yet, so the task did not wait it out.
        assert pool.get_stats().get("requests_errors", 0) == 0, pool.get_stats()
    finally:
        refresher.close()
    assert ran == []


async def test_a_creation_never_waits_behind_drift_checks(dsn: str) -> None:
    """Drift checks have a lane of their own: with every check slot of the database taken and another check
    queued, an apply (a creation) runs at once."""
    refresher = Refresher(
        RefreshMetrics(), RunnerSettings(max_concurrent_applies_per_database=1, max_concurrent_checks_per_database=1)
    )
    try:
        async with lane_held(refresher, dsn, "check") as queued:
            async with asyncio.timeout(30):  # bounds a hang: behind the checks this would wait for their minute
                created = await refresher.run_sync(dsn, lambda conn: conn.execute("SELECT 'created'").fetchone())
            assert created == ("created",)
            assert not queued.done(), "the second check still waits for the check lane"
    finally:
        refresher.close()


@contextlib.asynccontextmanager
async def lane_held(refresher: Refresher, dsn: str, lane: Lane) -> AsyncIterator[asyncio.Task[Any]]:
    """Every slot of lane (capped at 1) taken by work that waits for the block's end, and a second piece of work
    queued behind it (yielded, to show it still waits)."""
    started, release = threading.Event(), threading.Event()

    def long_work(conn: Connection) -> None:
        started.set()
        release.wait(60)

    holding = asyncio.create_task(refresher.run_sync(dsn, long_work, lane))
    queued = asyncio.create_task(refresher.run_sync(dsn, lambda conn: "second", lane))
    try:
        await asyncio.to_thread(started.wait, 60)
        yield queued
    finally:
        release.set()
        await asyncio.gather(holding, queued, return_exceptions=True)


async def test_a_first_refresh_never_waits_behind_applies_to_learn_what_it_reads(db: Connection, dsn: str) -> None:
    """Before a view's first refresh the scheduler asks what it reads (to refresh upstream views first). That
    question is part of the refresh: with every apply slot of the database taken (kopf creating thousands of
    views), it is answered at once, not after the applies (3,000 views once waited three minutes for it)."""
    from matview.cli.files import FileFeeder

    totals = mv("totals")
    engine.apply(db, totals)
    refresher = Refresher(RefreshMetrics(), RunnerSettings(max_concurrent_applies_per_database=1))
    feeder = FileFeeder(dsn, [], refresher)
    try:
        async with lane_held(refresher, dsn, "apply") as queued:
            async with asyncio.timeout(30):  # bounds a hang: behind the applies this would wait for their minute
                found = await feeder.reads(totals.owner, totals)
            assert ("ops", "events") in found, found
            assert not queued.done(), "the second apply still waits for the apply lane"
    finally:
        refresher.close()


async def test_a_refresh_waiting_for_its_lane_counts_as_late_and_in_progress_only_while_it_runs(
    db: Connection, dsn: str
) -> None:
    """A lane of one slot, a refresh held in it (its query waits for an advisory lock the test holds) and a second
    one due 30 s ago behind it: the second is in progress only once its lane's thread starts it (the gauge says 0
    while it waits), and its start lateness counts the wait for the slot as well as the 30 s."""
    held = mv(
        "held",
        query="SELECT kind, count(*) AS n FROM ops.events, (SELECT pg_advisory_xact_lock_shared(4646)) s GROUP BY kind",
    )
    behind = mv("behind")
    for v in (held, behind):
        engine.apply(db, v)
    metrics = RefreshMetrics()
    refresher = Refresher(metrics, RunnerSettings(max_concurrent_per_database=1, base_concurrent_per_database=1))

    def in_progress(v: MaterializedView) -> float | None:
        return metrics.registry.get_sample_value(
            "matview_refresh_in_progress", {"namespace": v.namespace, "name": v.resource_name}
        )

    db.execute("SELECT pg_advisory_lock(4646)")
    try:
        first = asyncio.create_task(refresher.refresh(dsn, held, "Full"))
        async with asyncio.timeout(30):  # bounds a hang only: the gauge turns 1 when the lane's thread starts it
            while in_progress(held) != 1:
                await asyncio.sleep(0.01)
        second = asyncio.create_task(refresher.refresh(dsn, behind, "Full", due_at=time.time() - 30))
        await asyncio.sleep(0)
        assert refresher.waiting() == 1 and in_progress(behind) in (None, 0.0), "waiting is not in progress"
        db.execute("SELECT pg_advisory_unlock(4646)")
        results = await asyncio.gather(first, second)
    finally:
        db.execute("SELECT pg_advisory_unlock_all()")
        refresher.close()
    assert [r.result for r in results] == ["success", "success"], results
    assert in_progress(held) == 0 and in_progress(behind) == 0
    count = metrics.registry.get_sample_value("matview_refresh_start_lateness_seconds_count")
    late = metrics.registry.get_sample_value("matview_refresh_start_lateness_seconds_sum")
    assert count == 1 and late is not None and late >= 30, (count, late)


@pytest.mark.parametrize("storage", ["MaterializedView", "Table"])
def test_a_view_another_session_holds_exclusively_fails_the_refresh_instead_of_holding_it_forever(
    db: Connection, dsn: str, storage: str
) -> None:
    """Before a step sets its own timeouts, the lock's take and the inspection read the view too (an incremental
    Table's size): they wait for a lock no longer than the session's bound (session.SESSION_LOCK_TIMEOUT), and
    the refresh says why it failed. Without the bound, the Table's refresh waited for as long as the holder
    liked."""
    table = storage == "Table"
    incremental: dict[str, Any] = (
        {"incremental": {"keyColumns": ["kind"], "sources": [{"table": "ops.events", "columns": ["kind"]}]}}
        if table
        else {}
    )
    view_ = mv(
        storage=storage,
        query="SELECT kind, count(*) AS n, sum(amount) AS total FROM ops.events GROUP BY kind" if table else QUERY,
        refresh={"interval": "1h", "lockTimeout": "100ms"},
        **incremental,
    )
    engine.apply(db, view_)
    with psycopg.connect(dsn) as holder:
        # A plain REFRESH by somebody else (a materialized view takes no LOCK TABLE), or a LOCK TABLE.
        holder.execute(
            "LOCK TABLE ops.totals IN ACCESS EXCLUSIVE MODE" if table else "REFRESH MATERIALIZED VIEW ops.totals"
        )
        db.execute("INSERT INTO ops.events VALUES (1000, 'k1', 1)")  # something to apply
        started = time.monotonic()
        result = refresh(db, view_, force=True)
        waited = time.monotonic() - started
        holder.rollback()
    assert result.result == "failure" and result.failure_reason == "lock_timeout", result
    assert waited < 60, waited  # bounded (a lock wait without lock_timeout never ends)
    again = refresh(db, view_, force=True)
    assert again.result == "success", again
