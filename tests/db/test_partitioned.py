"""Partitioned views (spec.partitioning, issue #25) against a real PostgreSQL: the partitions come from the
data, a rebuild keeps them named after the view, reads on the partition column are pruned, incremental
refresh routes rows, and bad declarations are refused before anything is made.

The workload is the driver-matrix example, partitioned by ``week_start`` (range) or ``origin_tag`` (list);
every check compares the stored rows with a full recompute of the same query, duplicates counted.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.api import sqltext
from matview.api.spec import MaterializedView
from matview.constants import APPLICATION_NAME
from matview.errors import SpecError
from matview.observe.metrics import RefreshMetrics
from matview.plan import engine, partitions
from matview.plan.executor import ExecutionSettings
from matview.plan.observed import Connection
from matview.refresh import RefreshResult, apply_and_record, facts, refresh, verify
from matview.refresh.refresher import Refresher
from tests.db.test_incremental import SCHEMA_SQL, SOURCES, mismatches, random_batch
from tests.db.test_pages import walk
from tests.helpers import cli_on, document, to_yaml, view

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def matrix(conn: Connection) -> Connection:
    conn.execute(SCHEMA_SQL)
    conn.execute("SELECT ops.load_driver_matrix(300)")
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn


def _spec() -> dict[str, Any]:
    return {
        "schema": "ops",
        "name": "weekly",
        "storage": "Table",
        "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
        "indexes": [{"columns": ["driver_id"]}],
        "refresh": {"interval": "1m"},
    }


#: Each row of the view comes from one lead, in the week of its lead_date: a week's partition is built from
#: that week's leads.
WEEKLY = {
    "column": "week_start",
    "by": "Range",
    "period": "Week",
    "ahead": 2,
    "sources": [{"table": "ops.leads", "column": "lead_date"}],
}


#: An incremental weekly view whose Auto always prefers a rebuild: any change is above its fullRebuildRatio.
REBUILDS = {"keyColumns": ["driver_id"], "sources": SOURCES, "fullRebuildRatio": 0.000001}


def weekly_view(**overrides: Any) -> MaterializedView:
    spec = {**_spec(), "partitioning": WEEKLY}
    spec.update(overrides)
    return view("weekly", **spec)


def partitions_of(conn: Connection, schema: str, name: str) -> dict[str, str]:
    """{partition name: its bound} of a partitioned table."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass",
        (f"{schema}.{name}",),
    ).fetchall()
    return {str(name): str(bound) for name, bound in rows}


def utc_week() -> datetime.date:
    today = datetime.datetime.now(datetime.UTC).date()
    return today - datetime.timedelta(days=today.weekday())


def rows_in(conn: Connection, schema: str, table: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()
    assert row is not None
    return int(row[0])


def test_a_range_partitioned_view_gets_one_partition_per_week_of_its_data_plus_ahead_and_a_default(
    matrix: Connection,
) -> None:
    mv = weekly_view()
    before = utc_week()
    apply_and_record(matrix, mv)
    after = utc_week()
    relkind = matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.weekly'::regclass").fetchone()
    assert relkind == ("p",)
    weeks = {
        row[0]
        for row in matrix.execute(
            "SELECT DISTINCT week_start FROM ops.v_payments_driver_matrix_cabinet WHERE week_start IS NOT NULL"
        )
    }
    assert len(weeks) > 3
    found = partitions_of(matrix, "ops", "weekly")

    def expected(current: datetime.date) -> set[str]:
        newest = max([*weeks, current])
        ahead = {newest + datetime.timedelta(days=7), newest + datetime.timedelta(days=14)}
        labels = {partitions.range_label(w) for w in weeks | ahead | {current}} | {partitions.DEFAULT_LABEL}
        return {partitions.partition_name("weekly", label) for label in labels}

    assert set(found) in (expected(before), expected(after))  # the build ran in one of these weeks
    assert found["weekly_p_default"] == "DEFAULT"
    some_week = min(weeks)
    assert found[f"weekly_p{some_week:%Y%m%d}"] == (
        f"FOR VALUES FROM ('{some_week}') TO ('{some_week + datetime.timedelta(days=7)}')"
    )
    # Every row sits in its week's partition; only rows without a week are in the default one.
    nulls = matrix.execute("SELECT count(*) FROM ops.weekly WHERE week_start IS NULL").fetchone()
    assert nulls is not None and rows_in(matrix, "ops", "weekly_p_default") == nulls[0]
    assert mismatches(matrix, mv) == (0, 0)
    flat = matrix.execute("SELECT to_regclass('ops.weekly_mv_flat')").fetchone()
    assert flat == (None,)  # the flat copy lives only inside the build's transaction
    assert apply_and_record(matrix, mv).changed is False  # converged: a second apply does nothing


def test_a_read_filtered_on_the_partition_column_is_pruned_to_one_partition(matrix: Connection) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    week = matrix.execute("SELECT min(week_start) FROM ops.weekly").fetchone()
    assert week is not None
    plan = "\n".join(
        str(row[0])
        for row in matrix.execute("EXPLAIN SELECT * FROM ops.weekly WHERE week_start = %s::date", (week[0],))
    )
    assert f"weekly_p{week[0]:%Y%m%d}" in plan, plan
    assert plan.count("weekly_p") == 1, plan  # no other partition, nor the default one, is scanned


def test_a_list_partitioned_view_gets_one_partition_per_value(matrix: Connection) -> None:
    mv = weekly_view(partitioning={"column": "origin_tag", "by": "List"})
    apply_and_record(matrix, mv)
    tags = [row[0] for row in matrix.execute("SELECT DISTINCT origin_tag FROM ops.v_payments_driver_matrix_cabinet")]
    found = partitions_of(matrix, "ops", "weekly")
    assert set(found) == {partitions.partition_name("weekly", partitions.list_label(t)) for t in tags} | {
        "weekly_p_default"
    }
    assert rows_in(matrix, "ops", "weekly_p_default") == 0
    assert mismatches(matrix, mv) == (0, 0)


def test_a_query_change_rebuilds_by_swap_keeping_a_dependent_view_and_the_partition_names(matrix: Connection) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    matrix.execute("CREATE VIEW ops.weekly_report AS SELECT week_start, count(*) AS n FROM ops.weekly GROUP BY 1")
    changed = weekly_view(query="SELECT * FROM ops.v_payments_driver_matrix_cabinet WHERE driver_id % 2 = 0")
    result = apply_and_record(matrix, changed)
    assert any("swap" in step for step in result.done), result.done
    assert mismatches(matrix, changed) == (0, 0)
    found = partitions_of(matrix, "ops", "weekly")
    assert "weekly_p_default" in found
    assert all(name.startswith("weekly_p") for name in found), found  # none keeps the staging copy's name
    leftovers = matrix.execute(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'weekly\\_mv\\_%' OR relname LIKE '%\\_stg\\_%'"
    ).fetchone()
    assert leftovers == (0,)  # partitions and their indexes are all named after the view and its indexes
    report = matrix.execute("SELECT sum(n) FROM ops.weekly_report").fetchone()
    assert report is not None and report[0] == rows_in(matrix, "ops", "weekly")


def test_a_partitioned_table_view_becomes_unpartitioned_and_back_by_swap(matrix: Connection) -> None:
    plain = weekly_view()
    unpartitioned = view("weekly", **_spec())
    apply_and_record(matrix, unpartitioned)
    assert matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.weekly'::regclass").fetchone() == ("r",)
    apply_and_record(matrix, plain)
    assert matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.weekly'::regclass").fetchone() == ("p",)
    assert mismatches(matrix, plain) == (0, 0)
    apply_and_record(matrix, unpartitioned)
    assert matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.weekly'::regclass").fetchone() == ("r",)
    assert mismatches(matrix, unpartitioned) == (0, 0)
    orphans = matrix.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'weekly%p_default'").fetchone()
    assert orphans == (0,)


def test_an_index_added_to_a_partitioned_view_is_built_on_every_partition(matrix: Connection) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    more = weekly_view(indexes=[{"columns": ["driver_id"]}, {"columns": ["driver_id", "week_start"], "unique": True}])
    result = apply_and_record(matrix, more)
    assert any("writes wait" in step for step in result.done), result.done
    per_partition = matrix.execute(
        "SELECT count(*) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid "
        "WHERE h.inhparent = 'ops.weekly'::regclass AND i.indisunique"
    ).fetchone()
    assert per_partition == (len(partitions_of(matrix, "ops", "weekly")),)
    assert apply_and_record(matrix, more).changed is False


def test_incremental_refresh_of_a_partitioned_view_routes_rows_to_their_weeks(matrix: Connection) -> None:
    mv = weekly_view(incremental={"keyColumns": ["driver_id"], "sources": SOURCES})
    apply_and_record(matrix, mv)
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date - 7 WHERE driver_id IN (3, 4)")  # rows change week
    matrix.execute("DELETE FROM ops.payments WHERE driver_id = 12")
    assert mismatches(matrix, mv) != (0, 0)
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Incremental", result
    assert mismatches(matrix, mv) == (0, 0)


@pytest.mark.parametrize(
    ("partitioning", "field", "words"),
    [
        ({"column": "nope", "by": "List"}, "spec.partitioning.column", "not in the query's result"),
        ({"column": "driver_id", "by": "Range", "period": "Week"}, "spec.partitioning.column", "of type bigint"),
        ({"column": "doc", "by": "List"}, "spec.partitioning.column", "of type json, which has no default btree"),
    ],
)
def test_a_bad_partition_column_is_refused_naming_the_field_and_nothing_is_made(
    matrix: Connection, partitioning: dict[str, Any], field: str, words: str
) -> None:
    query = "SELECT *, '{}'::json AS doc FROM ops.v_payments_driver_matrix_cabinet"
    with pytest.raises(SpecError) as raised:
        engine.apply(matrix, weekly_view(query=query, partitioning=partitioning))
    assert field in str(raised.value) and words in str(raised.value), raised.value
    made = matrix.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'weekly%'").fetchone()
    assert made == (0,)


HOSTILE_VALUES = [
    "x'); DROP TABLE ops.victim; --",
    'quote"d',
    "",
    None,
    "é" * 40,  # a long multibyte value: its label is a digest, the name still fits
    "y" * 2000,  # longer than a list value may be: no partition of its own, its rows go to DEFAULT
]


def test_hostile_list_values_are_literals_and_odd_dates_go_to_default(conn: Connection) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.victim (id int); CREATE TABLE ops.src (tag text, at timestamptz)")
    conn.execute(
        "INSERT INTO ops.src SELECT t, d::timestamptz FROM unnest(%s::text[]) AS t, "
        "unnest(ARRAY['infinity', '-infinity', '4713-01-01 BC', '2026-03-04 10:00', '294000-01-01']) AS d",
        (HOSTILE_VALUES,),
    )
    name = "v" * 63  # the longest name a view may have: every partition name is cut to fit, the label kept
    by_tag = view(
        "hostile",
        schema="ops",
        name=name,
        storage="Table",
        query="SELECT tag, at FROM ops.src",
        partitioning={"column": "tag", "by": "List"},
    )
    engine.apply(conn, by_tag)
    found = partitions_of(conn, "ops", name)
    assert len(found) == len(HOSTILE_VALUES) - 1 + 1  # one per value but the too-long one, and the default
    assert all(len(p.encode()) <= 63 for p in found)
    assert conn.execute("SELECT to_regclass('ops.victim')").fetchone() == ("ops.victim",)
    default = partitions.partition_name(name, partitions.DEFAULT_LABEL)
    assert conn.execute(f'SELECT DISTINCT length(tag) FROM ops."{default}"').fetchall() == [(2000,)]

    days = {datetime.datetime.now(datetime.UTC).date()}
    by_day = view(
        "hostile",
        schema="ops",
        name=name,
        storage="Table",
        query="SELECT tag, at FROM ops.src",
        partitioning={"column": "at", "by": "Range", "period": "Day"},
    )
    engine.apply(conn, by_day)
    days.add(datetime.datetime.now(datetime.UTC).date())
    found = partitions_of(conn, "ops", name)
    assert (
        {default, partitions.partition_name(name, "p20260304")}
        <= set(found)
        <= {
            default,
            partitions.partition_name(name, "p20260304"),
            *(partitions.partition_name(name, f"p{day:%Y%m%d}") for day in days),
        }
    )
    in_default = conn.execute(f'SELECT count(*) FROM ops."{default}"').fetchone()
    assert in_default == (4 * len(HOSTILE_VALUES),)  # infinities, BC and beyond year 9990: the default's


def test_partition_names_keep_their_label_whatever_the_parent_is_cut_to() -> None:
    for parent in ("a", "w" * 63, "é" * 31 + "x"):
        for label in (
            partitions.DEFAULT_LABEL,
            partitions.range_label(datetime.date(2026, 1, 5)),
            partitions.list_label("x"),
            partitions.list_label(None),
        ):
            name = partitions.partition_name(parent, label)
            assert len(name.encode()) <= 63 and name.endswith("_" + label) and len(label) == partitions.LABEL_LENGTH
    assert partitions.list_label(None) != partitions.list_label("") != partitions.list_label("\x00null")


def test_timestamptz_ranges_are_utc_periods_whatever_time_zone_the_build_ran_in(conn: Connection) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.events (id int, at timestamptz)")
    conn.execute("INSERT INTO ops.events VALUES (1, '2026-03-04 20:00+00'), (2, '2026-03-05 01:00+00')")
    conn.execute("SET TimeZone = 'Asia/Tokyo'")  # 2026-03-05 05:00 and 10:00 there: one local day, two UTC days
    daily = view(
        "daily",
        schema="ops",
        storage="Table",
        query="SELECT id, at FROM ops.events",
        partitioning={"column": "at", "by": "Range", "period": "Day"},
    )
    days = {datetime.datetime.now(datetime.UTC).date()}
    engine.apply(conn, daily)
    days.add(datetime.datetime.now(datetime.UTC).date())
    found = partitions_of(conn, "ops", "daily")
    today = {f"daily_p{day:%Y%m%d}" for day in days}  # the current period has a partition, ready for its rows
    assert (
        {"daily_p20260304", "daily_p20260305", "daily_p_default"}
        <= set(found)
        <= today
        | {
            "daily_p20260304",
            "daily_p20260305",
            "daily_p_default",
        }
    )
    assert conn.execute("SELECT id FROM ops.daily_p20260304").fetchall() == [(1,)]
    assert conn.execute("SELECT id FROM ops.daily_p20260305").fetchall() == [(2,)]
    assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)  # the build's UTC ended with it


def partition_built(conn: Connection, schema: str, name: str) -> dict[str, str | None]:
    """{partition: when the rebuild that made it began} (None: not made by a per-partition rebuild)."""
    rows = conn.execute(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass",
        (f"{schema}.{name}",),
    ).fetchall()
    return {str(n): (json.loads(c).get("state", {}).get("built") if c else None) for n, c in rows}


def counted(result: RefreshResult, counter: str, **labels: str) -> float | None:
    """What a counter of the view reads once the refresh is recorded in fresh metrics."""
    metrics = RefreshMetrics()
    metrics.record("ops", "weekly", result)
    return metrics.registry.get_sample_value(counter, {"namespace": "ops", "name": "weekly", **labels})


def past_the_last_success(conn: Connection) -> None:
    """Wait until a rebuild would begin a whole second after the last success the marker records (to the
    second): one that begins within it may have been that success, and a resumed rebuild redoes it."""
    state = facts.inspect(conn, weekly_view()).state
    assert state.last_success is not None
    while datetime.datetime.now(datetime.UTC) < state.last_success + datetime.timedelta(seconds=1):
        time.sleep(0.01)


def ours_left_beside(conn: Connection, name: str) -> list[str]:
    """Tables named like a staging or retired copy (or partition of one) of the view."""
    rows = conn.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE %s OR relname LIKE %s ORDER BY 1",
        (f"{name}\\_mv\\_staging%", f"{name}\\_mv\\_retired%"),
    ).fetchall()
    return [str(r[0]) for r in rows]


def test_a_full_refresh_rebuilds_a_range_partitioned_view_a_partition_at_a_time(matrix: Connection) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    parent_oid = matrix.execute("SELECT 'ops.weekly'::regclass::oid").fetchone()
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date - 7 WHERE driver_id % 10 = 0")  # rows change week
    matrix.execute("DELETE FROM ops.payments WHERE driver_id % 7 = 0")
    assert mismatches(matrix, mv) != (0, 0)
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert mismatches(matrix, mv) == (0, 0)
    assert result.partitions is not None
    assert set(result.partitions.rebuilt) == set(partitions_of(matrix, "ops", "weekly"))
    assert f"rebuilt {len(result.partitions.rebuilt)} partition(s) one at a time" in result.reason
    assert counted(result, "matview_partitions_rebuilt_total", scope="all") == len(result.partitions.rebuilt)
    # The parent was never replaced (a dependent view or a reader's plan keeps it), every partition was.
    assert matrix.execute("SELECT 'ops.weekly'::regclass::oid").fetchone() == parent_oid
    built = partition_built(matrix, "ops", "weekly")
    assert built and all(b is not None for b in built.values()), built
    assert len(set(built.values())) == 1  # one rebuild made them all
    assert ours_left_beside(matrix, "weekly") == []
    assert set(built) == set(partitions_of(matrix, "ops", "weekly"))
    assert apply_and_record(matrix, mv).changed is False  # the rebuilt partitions are what apply expects


def test_a_rebuild_interrupted_between_partitions_resumes_where_it_stopped(matrix: Connection, dsn: str) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    past_the_last_success(matrix)
    matrix.execute("UPDATE ops.leads SET origin_tag = 'web' WHERE driver_id % 3 = 0")
    weeks = sorted(n for n in partitions_of(matrix, "ops", "weekly") if n != "weekly_p_default")
    blocked = weeks[len(weeks) // 2]  # rebuilt newest first: the default and the newer half go before it
    with psycopg.connect(dsn, autocommit=False) as reader:
        reader.execute(f"LOCK TABLE ops.{blocked} IN ACCESS SHARE MODE")  # a long read of that one partition
        settings = ExecutionSettings(lock_timeout_seconds=0.2, lock_retries=1)
        failed = refresh(matrix, mv, settings=settings)
        assert failed.result == "failure", failed
        assert f"swap the rebuilt partition {blocked} in" in (failed.message or ""), failed.message
        first = partition_built(matrix, "ops", "weekly")
        done = {n for n, b in first.items() if b is not None}
        assert done == {"weekly_p_default", *(w for w in weeks if w > blocked)}, (done, blocked)
        assert ours_left_beside(matrix, "weekly") == [f"weekly_mv_staging_{blocked[-9:]}"]  # built, not swapped in
    result = refresh(matrix, mv)
    assert result.result == "success", result
    assert result.partitions is not None and set(result.partitions.resumed) == done, result.partitions
    assert f"{len(done)} more rebuilt already by a rebuild that stopped" in result.reason
    second = partition_built(matrix, "ops", "weekly")
    assert {n: second[n] for n in done} == {n: first[n] for n in done}  # not rebuilt again
    assert all(second[w] is not None and second[w] != first[next(iter(done))] for w in weeks if w <= blocked)
    assert ours_left_beside(matrix, "weekly") == []
    assert mismatches(matrix, mv) == (0, 0)
    again = refresh(matrix, mv)  # a finished rebuild is not resumed: the next one rebuilds every partition
    third = partition_built(matrix, "ops", "weekly")
    assert again.result == "success" and all(third[n] != second[n] for n in third), (again, third)


def test_readers_see_every_row_throughout_a_per_partition_rebuild(matrix: Connection, dsn: str) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    total = rows_in(matrix, "ops", "weekly")
    counts: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        with psycopg.connect(dsn, autocommit=True) as reader:
            while not stop.is_set():
                try:
                    row = reader.execute("SELECT count(*) FROM ops.weekly").fetchone()
                    counts.append(int(row[0]) if row else -1)
                except psycopg.Error as error:
                    errors.append(error)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(2):
            result = refresh(matrix, mv)
            assert result.result == "success", result
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(counts) > 10 and set(counts) == {total}  # never a partition missing nor counted twice


def test_without_partition_sources_a_full_refresh_rebuilds_the_whole_view_and_keeps_its_partitions(
    matrix: Connection,
) -> None:
    mv = weekly_view(partitioning={k: v for k, v in WEEKLY.items() if k != "sources"})
    apply_and_record(matrix, mv)
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date + 7 WHERE driver_id % 5 = 0")
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert mismatches(matrix, mv) == (0, 0)
    found = partitions_of(matrix, "ops", "weekly")
    assert "weekly_p_default" in found and all(name.startswith("weekly_p") for name in found)
    assert set(partition_built(matrix, "ops", "weekly").values()) == {None}  # built whole, not one at a time
    assert ours_left_beside(matrix, "weekly") == []


@pytest.mark.parametrize(
    ("source", "field", "words"),
    [
        ({"table": "ops.nowhere", "column": "d"}, "spec.partitioning.sources[0].table", "does not exist"),
        ({"table": "ops.leads", "column": "nope"}, "spec.partitioning.sources[0].column", "has no column 'nope'"),
        ({"table": "ops.leads", "column": "origin_tag"}, "spec.partitioning.sources[0].column", "of type text"),
        ({"table": "ops.victim", "column": "at"}, "spec.partitioning.sources[0].table", "does not read ops.victim"),
    ],
)
def test_bad_partition_sources_are_refused_naming_the_field(
    matrix: Connection, source: dict[str, str], field: str, words: str
) -> None:
    matrix.execute("CREATE TABLE ops.victim (at date)")
    with pytest.raises(SpecError) as raised:
        engine.apply(matrix, weekly_view(partitioning={**WEEKLY, "sources": [source]}))
    assert f"{field}: " in str(raised.value) and words in str(raised.value), raised.value
    made = matrix.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'weekly%'").fetchone()
    assert made == (0,)


def test_a_period_predicate_takes_only_the_engines_own_bounds() -> None:
    good = partitions.bound_literal(datetime.date(2026, 1, 5))
    assert "OPERATOR(pg_catalog.>=) '2026-01-05 00:00:00+00'" in sqltext.period_predicate("d", good, good)
    for bad in ("2026-01-05' OR true --", "2026-01-05", "now()"):
        with pytest.raises(ValueError, match="not a period bound"):
            sqltext.period_predicate("d", bad, good)


def kept_mismatches(conn: Connection, mv: MaterializedView, cutoff: datetime.date) -> tuple[int, int]:
    """mismatches, against the query's rows the retention window keeps."""
    stored = f"SELECT * FROM {mv.schema}.{mv.name}"
    computed = f"SELECT * FROM ({mv.query.text}) q WHERE q.week_start IS NULL OR q.week_start >= '{cutoff}'"
    extra = conn.execute(f"SELECT count(*) FROM ({stored} EXCEPT ALL {computed}) d").fetchone()
    missing = conn.execute(f"SELECT count(*) FROM ({computed} EXCEPT ALL {stored}) d").fetchone()
    assert extra is not None and missing is not None
    return int(extra[0]), int(missing[0])


def window_start(conn: Connection, mv: MaterializedView, before: datetime.date, after: datetime.date) -> datetime.date:
    """The first week the view keeps: its oldest range partition's, which is the cutoff as of the refresh
    (computed before or after it: a refresh may straddle the start of a week)."""
    weeks = [
        partitions.range_start(name[-9:])
        for name in partitions_of(conn, mv.schema, mv.name)
        if not name.endswith("default")
    ]
    oldest = min(w for w in weeks if w is not None)
    assert oldest in (before, after), (oldest, before, after)
    return oldest


def test_retention_retires_old_partitions_after_a_refresh_and_never_rebuilds_them(matrix: Connection) -> None:
    mv = weekly_view(partitioning={**WEEKLY, "retain": "8w"})
    apply_and_record(matrix, mv)
    oldest_built = min(partitions_of(matrix, "ops", "weekly"))
    before = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
    result = refresh(matrix, mv)
    after = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
    assert result.result == "success" and result.mode == "Swap", result
    assert before is not None and after is not None
    cutoff = window_start(matrix, mv, before, after)
    assert oldest_built not in partitions_of(matrix, "ops", "weekly")
    assert result.partitions is not None and oldest_built in result.partitions.retired
    assert f"retired {oldest_built}" in result.reason
    assert counted(result, "matview_partitions_retired_total") == len(result.partitions.retired)
    assert kept_mismatches(matrix, mv, cutoff) == (0, 0)
    old = matrix.execute("SELECT count(*) FROM ops.weekly WHERE week_start < %s", (cutoff,)).fetchone()
    assert old == (0,)
    assert ours_left_beside(matrix, "weekly") == []


def test_incremental_refresh_after_retention_puts_no_retired_row_back(matrix: Connection) -> None:
    mv = weekly_view(
        partitioning={**{k: v for k, v in WEEKLY.items() if k != "sources"}, "retain": "8w"},
        incremental={"keyColumns": ["driver_id"], "sources": SOURCES},
        indexes=[{"columns": ["driver_id"]}],
    )
    apply_and_record(matrix, mv)
    before = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
    quiet = refresh(matrix, mv)  # nothing to apply: the window still moves on
    after = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
    assert quiet.result == "skipped" and quiet.reason == "no changes pending", quiet
    assert quiet.partitions is not None and quiet.partitions.retired and "retired " in quiet.message, quiet
    assert before is not None and after is not None
    cutoff = window_start(matrix, mv, before, after)
    assert kept_mismatches(matrix, mv, cutoff) == (0, 0)
    files: dict[str, int] = dict(
        matrix.execute(
            "SELECT c.relname, c.relfilenode FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'ops.weekly'::regclass"
        ).fetchall()
    )
    # Changes to drivers whose rows lie before the window, and one moving a driver out of it.
    old = matrix.execute(
        "SELECT min(driver_id), max(driver_id) FROM ops.v_payments_driver_matrix_cabinet WHERE week_start < %s",
        (cutoff,),
    ).fetchone()
    kept_driver = matrix.execute("SELECT min(driver_id) FROM ops.weekly WHERE week_start IS NOT NULL").fetchone()
    assert old is not None and kept_driver is not None
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id IN (%s, %s)", old)
    matrix.execute(
        "UPDATE ops.leads SET lead_date = %s WHERE driver_id = %s",
        (cutoff - datetime.timedelta(days=1), kept_driver[0]),
    )
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Incremental", result
    assert matrix.execute("SELECT count(*) FROM ops.weekly WHERE week_start < %s", (cutoff,)).fetchone() == (0,)
    assert kept_mismatches(matrix, mv, cutoff) == (0, 0)
    verification = verify.compare(matrix, mv, ExecutionSettings())
    assert verification.matches, verification
    # Retention rewrote nothing: the partitions it kept are the files they were.
    after_files: dict[str, int] = dict(
        matrix.execute(
            "SELECT c.relname, c.relfilenode FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'ops.weekly'::regclass"
        ).fetchall()
    )
    assert after_files == files


@pytest.mark.parametrize(
    ("partitioning", "field"),
    [
        ({"column": "origin_tag", "by": "List", "retain": "8w"}, "spec.partitioning.retain"),
        ({**WEEKLY, "retain": "0w"}, "spec.partitioning.retain"),
        ({**WEEKLY, "retain": "8 weeks; DROP TABLE x"}, "spec.partitioning.retain"),
        ({"column": "origin_tag", "by": "List", "sources": WEEKLY["sources"]}, "spec.partitioning.sources"),
    ],
)
def test_retention_and_sources_apply_only_to_valid_range_declarations(partitioning: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as raised:
        weekly_view(partitioning=partitioning)
    assert f"{field}: " in str(raised.value), raised.value


@pytest.mark.parametrize(
    ("retain", "by_partition", "rebuilds"),
    [(None, False, False), ("8w", False, False), (None, True, False), ("8w", True, False), ("8w", True, True)],
)
def test_random_writes_to_a_partitioned_incremental_view_always_equal_a_full_recompute(
    matrix: Connection, retain: str | None, by_partition: bool, rebuilds: bool
) -> None:
    """The randomized equivalence suite (tests/db/test_incremental.py) on a weekly-partitioned incremental view:
    leads move between weeks, into weeks without a partition (the DEFAULT one) and, with retention, out of
    the window; full rebuilds go a partition at a time when the leads are its partition source (``rebuilds``:
    Auto rebuilds whatever changed, so most refreshes rebuild only the partitions the changes touch); after
    every refresh, stored = computed (inside the window)."""
    seed = int(os.environ.get("MATVIEW_EQUIVALENCE_SEED", "20261204"))
    batches = int(os.environ.get("MATVIEW_EQUIVALENCE_BATCHES", "2000")) // (8 if rebuilds else 2)
    rng = random.Random(seed)
    weekly = WEEKLY if by_partition else {k: v for k, v in WEEKLY.items() if k != "sources"}
    mv = weekly_view(
        partitioning={**weekly, **({"retain": retain} if retain else {})},
        incremental=REBUILDS if rebuilds else {"keyColumns": ["driver_id"], "sources": SOURCES},
    )
    apply_and_record(matrix, mv)
    modes: dict[str, int] = {}
    recent: list[str] = []
    for batch in range(1, batches + 1):
        recent.append(random_batch(matrix, rng, 300))
        if batch % 4 and batch != batches:
            continue
        before = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
        result = refresh(matrix, mv)
        after = partitions.retention_cutoff(mv, datetime.datetime.now(datetime.UTC))
        assert result.result in ("success", "skipped"), result
        modes[result.mode] = modes.get(result.mode, 0) + 1
        if result.mode == "Swap" and result.partitions is not None and result.partitions.scope == "touched":
            modes["Swap of the touched partitions"] = modes.get("Swap of the touched partitions", 0) + 1
        if before is None or after is None:
            found = {mismatches(matrix, mv)}
        else:  # the window as of the refresh: a refresh may straddle the start of a week
            found = {kept_mismatches(matrix, mv, cutoff) for cutoff in (before, after)}
        assert (0, 0) in found, f"seed {seed}, batch {batch}, after {recent}: {result}"
        recent = []
    print("modes", modes)
    if rebuilds:
        assert modes.get("Swap of the touched partitions", 0) > batches // 16, modes
    else:
        assert modes.get("Incremental", 0) > batches // 8, modes
    assert modes.get("Swap", 0) >= 1, modes


def test_the_live_view_and_keyset_pages_work_unchanged_on_a_partitioned_view(matrix: Connection, dsn: str) -> None:
    mv = weekly_view(
        partitioning={k: v for k, v in WEEKLY.items() if k != "sources"},
        incremental={"keyColumns": ["driver_id"], "sources": SOURCES, "liveView": True},
        indexes=[{"columns": ["driver_id", "week_start"], "unique": True}],
    )
    apply_and_record(matrix, mv)
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date + 14 WHERE driver_id % 9 = 0")  # pending: rows move
    query = mv.query.text
    live = matrix.execute(
        f"SELECT (SELECT count(*) FROM (SELECT * FROM ops.weekly_live EXCEPT ALL {query}) a), "
        f"(SELECT count(*) FROM ({query} EXCEPT ALL SELECT * FROM ops.weekly_live) b)"
    ).fetchone()
    assert live == (0, 0)  # fresh to the last commit before any refresh
    expected = [r[0] for r in matrix.execute(f"SELECT driver_id FROM ({query}) q ORDER BY driver_id, week_start")]
    with psycopg.connect(dsn, autocommit=True) as reader:
        forward, backward = walk(reader, 13, ("ops", "weekly_live"), order=["driver_id", "week_start"])
        assert forward == expected and backward == expected
        assert refresh(matrix, mv).result == "success"
        forward, backward = walk(reader, 13, ("ops", "weekly"), order=["driver_id", "week_start"])
    assert forward == expected and backward == expected


def test_a_rebuild_killed_between_partitions_resumes_with_nothing_lost(
    matrix: Connection, dsn: str, tmp_path: Path
) -> None:
    """`matview refresh` SIGKILLed midway through a per-partition rebuild: the next refresh drops what it left,
    rebuilds only the partitions it had not finished, and the view equals the query."""
    # Each row of the build waits a little, so the rebuild takes seconds and the kill lands between partitions.
    slow = "SELECT v.* FROM ops.v_payments_driver_matrix_cabinet v, LATERAL (SELECT pg_sleep(0.02)) s"
    spec = {**_spec(), "query": slow, "partitioning": WEEKLY}
    mv = view("weekly", **spec)
    apply_and_record(matrix, mv)
    past_the_last_success(matrix)
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id % 4 = 0")
    file = tmp_path / "weekly.yaml"
    file.write_text(to_yaml(document("weekly", **spec)))
    process = subprocess.Popen(
        [sys.executable, "-m", "matview.cli", "refresh", "--dsn", dsn, "--mode", "Swap", str(file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while len([b for b in partition_built(matrix, "ops", "weekly").values() if b is not None]) < 5:
            assert process.poll() is None, "the rebuild finished before it could be killed"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # Its backend ends once the statement it was running notices the client is gone.
    while matrix.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
        (APPLICATION_NAME,),
    ).fetchone() != (0,):
        time.sleep(0.05)
    first = partition_built(matrix, "ops", "weekly")
    done = {name for name, built in first.items() if built is not None}
    assert 5 <= len(done) < len(first), first
    result = refresh(matrix, mv, "Swap")
    assert result.result == "success", result
    second = partition_built(matrix, "ops", "weekly")
    assert {name: second[name] for name in done} == {name: first[name] for name in done}  # not rebuilt again
    assert all(second[name] is not None for name in second)
    assert ours_left_beside(matrix, "weekly") == []
    assert mismatches(matrix, mv) == (0, 0)


def test_the_weekly_example_plans_applies_and_refreshes_through_the_cli(matrix: Connection) -> None:
    matview = cli_on(str(ROOT / "examples/driver-matrix-weekly.yaml"), matrix.info.dsn)

    plan = matview("plan")
    assert plan.returncode == 0, plan.stderr
    assert "PARTITION BY RANGE" in plan.stdout and "-- one partition per week of week_start" in plan.stdout
    assert matview("apply").returncode == 0
    refreshed = matview("refresh")
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    found = partitions_of(matrix, "ops", "driver_matrix_weekly")
    assert len(found) > 3 and "driver_matrix_weekly_p_default" in found
    assert all(b is not None for b in partition_built(matrix, "ops", "driver_matrix_weekly").values())


def test_the_periods_to_come_get_partitions_after_every_refresh_unless_their_rows_sit_in_default(
    matrix: Connection,
) -> None:
    mv = weekly_view(
        partitioning={k: v for k, v in WEEKLY.items() if k != "sources"},
        incremental={"keyColumns": ["driver_id"], "sources": SOURCES},
    )
    apply_and_record(matrix, mv)
    coming = [
        partitions.partition_name("weekly", partitions.range_label(d))
        for d in partitions.periods_to_come(mv, datetime.datetime.now(datetime.UTC))
    ]
    for name in coming:  # as if these weeks had come since the build
        matrix.execute(f"ALTER TABLE ops.weekly DETACH PARTITION ops.{name}")
        matrix.execute(f"DROP TABLE ops.{name}")
    quiet = refresh(matrix, mv)
    assert quiet.result == "skipped", quiet
    later = [
        partitions.partition_name("weekly", partitions.range_label(d))
        for d in partitions.periods_to_come(mv, datetime.datetime.now(datetime.UTC))
    ]
    found = set(partitions_of(matrix, "ops", "weekly"))
    assert set(coming) <= found or set(later) <= found  # made again, though nothing was applied (in either week)

    first = coming[0]
    matrix.execute(f"ALTER TABLE ops.weekly DETACH PARTITION ops.{first}")
    matrix.execute(f"DROP TABLE ops.{first}")
    week = partitions.range_start(first[-9:])
    matrix.execute("UPDATE ops.leads SET lead_date = %s WHERE driver_id = 7", (week,))  # its row goes to DEFAULT
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Incremental", result
    assert first not in partitions_of(matrix, "ops", "weekly")  # not made over the rows already in DEFAULT
    in_default = matrix.execute("SELECT count(*) FROM ops.weekly_p_default WHERE driver_id = 7").fetchone()
    assert in_default == (1,)
    assert mismatches(matrix, mv) == (0, 0)


def test_a_partition_swap_chosen_to_end_a_deadlock_is_retried(matrix: Connection, dsn: str) -> None:
    """A session holding one partition that then reads the whole view, while the swap of that partition holds
    the view and waits for the partition: a deadlock, whose victim is the swap (it waited first). The swap's
    transaction rolled back whole, so it is tried again, and the refresh succeeds."""
    mv = weekly_view()
    apply_and_record(matrix, mv)
    newest = max(n for n in partitions_of(matrix, "ops", "weekly") if n != "weekly_p_default")
    with psycopg.connect(dsn) as other:
        other.execute(f"LOCK TABLE ops.{newest} IN ACCESS SHARE MODE")  # newest: the first range rebuilt
        results: list[Any] = []
        refreshing = threading.Thread(target=lambda: results.append(refresh(matrix, mv)))
        refreshing.start()
        try:
            # The swap holds the view and waits for the partition the other session holds...
            while other.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass", (f"ops.{newest}",)
            ).fetchone() != (1,):
                time.sleep(0.02)
            # ...which now waits for the view: whoever waited first is chosen to end the deadlock, the swap.
            other.execute("SELECT count(*) FROM ops.weekly").fetchone()
            other.commit()
        finally:
            refreshing.join()
    [result] = results
    assert result.result == "success", result
    assert mismatches(matrix, mv) == (0, 0)
    assert ours_left_beside(matrix, "weekly") == []


def test_an_incremental_view_rebuilt_a_partition_at_a_time_loses_no_change_even_when_it_stops_midway(
    matrix: Connection, dsn: str
) -> None:
    mv = weekly_view(incremental={"keyColumns": ["driver_id"], "sources": SOURCES})
    apply_and_record(matrix, mv)
    past_the_last_success(matrix)
    matrix.execute("TRUNCATE ops.payments")  # a full rebuild is due
    weeks = sorted(n for n in partitions_of(matrix, "ops", "weekly") if n != "weekly_p_default")
    blocked = weeks[len(weeks) // 2]
    with psycopg.connect(dsn, autocommit=False) as reader:
        reader.execute(f"LOCK TABLE ops.{blocked} IN ACCESS SHARE MODE")
        failed = refresh(matrix, mv, settings=ExecutionSettings(lock_timeout_seconds=0.2, lock_retries=1))
    assert failed.result == "failure" and failed.mode == "Swap", failed
    # Changes after the rebuild began, to drivers whose partitions it had finished and to others.
    finished = [w for w in weeks if w > blocked]
    early = matrix.execute(f"SELECT min(driver_id) FROM ops.{finished[0]}").fetchone()
    late = matrix.execute(f"SELECT min(driver_id) FROM ops.{weeks[0]}").fetchone()
    assert early is not None and late is not None and early[0] is not None and late[0] is not None
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id IN (%s, %s)", (early[0], late[0]))
    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT %s, lead_date + 1 FROM ops.leads WHERE driver_id = %s",
        (early[0], early[0]),
    )
    resumed = refresh(matrix, mv)
    assert resumed.result == "success" and resumed.mode == "Swap", resumed
    assert resumed.partitions is not None and set(resumed.partitions.resumed) >= set(finished), resumed.partitions
    after = refresh(matrix, mv)  # what the finished partitions were built before is still in the log
    assert after.result == "success" and after.mode == "Incremental", after
    assert mismatches(matrix, mv) == (0, 0)
    pending = matrix.execute("SELECT count(*) FROM ops.weekly_mv_changes").fetchone()
    assert pending == (0,)


def test_a_partition_source_of_an_incremental_view_must_be_one_of_its_key_sources(matrix: Connection) -> None:
    keyed = [s for s in SOURCES if s["table"] != "ops.leads"]
    with pytest.raises(SpecError) as raised:
        engine.apply(matrix, weekly_view(incremental={"keyColumns": ["driver_id"], "sources": keyed}))
    assert "spec.partitioning.sources[0].table: ops.leads must also be one of spec.incremental.sources" in str(
        raised.value
    )


def test_deleting_a_partitioned_view_with_policy_delete_drops_every_partition_and_retain_keeps_them(
    matrix: Connection,
) -> None:
    kept = weekly_view(deletionPolicy="Retain")
    apply_and_record(matrix, kept)
    engine.delete(matrix, kept)
    assert len(partitions_of(matrix, "ops", "weekly")) > 3
    gone = weekly_view(deletionPolicy="Delete")
    engine.delete(matrix, gone)
    left = matrix.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'weekly%' AND relkind IN ('r', 'p')")
    assert left.fetchone() == (0,)


# --- Auto rebuilds only the partitions the changed keys touch --------------------------------------------------


def partition_oids(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT c.relname, c.oid FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'ops.weekly'::regclass"
    ).fetchall()
    return {str(name): int(oid) for name, oid in rows}


def partitions_holding(conn: Connection, drivers: list[int]) -> set[str]:
    """The partitions of ops.weekly holding a row of these drivers."""
    rows = conn.execute(
        "SELECT DISTINCT c.relname FROM ops.weekly w JOIN pg_class c ON c.oid = w.tableoid WHERE w.driver_id = ANY(%s)",
        (drivers,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def week_partitions_with_rows(conn: Connection) -> list[str]:
    """The range partitions holding rows, oldest first."""
    names = partitions_of(conn, "ops", "weekly")
    return sorted(n for n in names if n != "weekly_p_default" and rows_in(conn, "ops", n))


def swap_measured(conn: Connection, mv: MaterializedView) -> float | None:
    return facts.inspect(conn, mv).state.durations.get("Swap")


def test_auto_rebuilds_only_the_partitions_the_changed_keys_touch(matrix: Connection) -> None:
    mv = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, mv)
    weeks = week_partitions_with_rows(matrix)
    assert len(weeks) >= 6, weeks
    newest, older = weeks[-1], weeks[1]
    # Drivers of the newest week get a changed claim (their rows stay where they are); one lead of an older
    # week moves two weeks on (its driver's row leaves one partition for another).
    changed = [int(r[0]) for r in matrix.execute(f"SELECT DISTINCT driver_id FROM ops.{newest} LIMIT 3")]
    moved_row = matrix.execute(f"SELECT driver_id FROM ops.{older} LIMIT 1").fetchone()
    assert changed and moved_row is not None
    moved = int(moved_row[0])
    before = partitions_holding(matrix, [*changed, moved])
    oids = partition_oids(matrix)
    measured = swap_measured(matrix, mv)
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = ANY(%s)", (changed,))
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date + 14 WHERE driver_id = %s", (moved,))
    assert mismatches(matrix, mv) != (0, 0)

    result = refresh(matrix, mv)

    assert result.result == "success" and result.mode == "Swap", result
    assert mismatches(matrix, mv) == (0, 0)
    touched = before | partitions_holding(matrix, [*changed, moved])
    assert result.partitions is not None and result.partitions.scope == partitions.REBUILT_TOUCHED, result
    assert set(result.partitions.rebuilt) == touched, (result.partitions.rebuilt, touched)
    assert len(touched) < len(oids) - 3, touched  # a few of many
    after = partition_oids(matrix)
    assert {n for n in oids if after.get(n) != oids[n]} == touched  # every other partition is the same table
    untouched = len(oids) - len(touched)
    assert f"rebuilt only the {len(touched)} partition(s) the changed keys touch" in result.reason, result.reason
    assert f"{untouched} left as they were" in result.reason and newest in result.reason, result.reason
    assert result.as_dict()["partitions"]["scope"] == "touched"
    assert counted(result, "matview_partitions_rebuilt_total", scope="touched") == len(touched)
    assert matrix.execute("SELECT count(*) FROM ops.weekly_mv_changes").fetchone() == (0,)
    # What a rebuild of some partitions took says nothing of what rebuilding them all costs.
    assert swap_measured(matrix, mv) == measured
    assert ours_left_beside(matrix, "weekly") == []


def test_a_change_that_reaches_the_default_partition_rebuilds_it_with_the_touched_weeks_only(
    matrix: Connection,
) -> None:
    mv = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, mv)
    week = week_partitions_with_rows(matrix)[-1]
    row = matrix.execute(f"SELECT driver_id FROM ops.{week} LIMIT 1").fetchone()
    assert row is not None
    driver = int(row[0])
    oids = partition_oids(matrix)
    # Years before the data: no partition, so its row goes to DEFAULT, which only the whole query rebuilds.
    matrix.execute("UPDATE ops.leads SET lead_date = DATE '2001-01-03' WHERE driver_id = %s", (driver,))
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert result.partitions is not None and result.partitions.scope == partitions.REBUILT_TOUCHED, result
    expected = {"weekly_p_default", *(n for n in partitions_holding(matrix, [driver]) if n != "weekly_p_default")}
    assert set(result.partitions.rebuilt) == expected | {week}, (result.partitions.rebuilt, expected, week)
    assert result.partitions.rebuilt[0] == "weekly_p_default"
    in_default = matrix.execute("SELECT count(*) FROM ops.weekly_p_default WHERE driver_id = %s", (driver,))
    assert in_default.fetchone() == (1,)
    after = partition_oids(matrix)
    assert {n for n in oids if after.get(n) != oids[n]} == set(result.partitions.rebuilt)
    assert mismatches(matrix, mv) == (0, 0)
    assert matrix.execute("SELECT count(*) FROM ops.weekly_mv_changes").fetchone() == (0,)


def test_a_requested_swap_rebuilds_every_partition_and_is_measured(matrix: Connection) -> None:
    mv = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, mv)
    measured = swap_measured(matrix, mv)
    driver = matrix.execute(f"SELECT driver_id FROM ops.{week_partitions_with_rows(matrix)[-1]} LIMIT 1").fetchone()
    assert driver is not None
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = %s", driver)
    result = refresh(matrix, mv, "Swap")
    assert result.result == "success" and result.mode == "Swap", result
    assert result.partitions is not None and result.partitions.scope == partitions.REBUILT_ALL, result
    assert set(result.partitions.rebuilt) == set(partitions_of(matrix, "ops", "weekly"))
    assert mismatches(matrix, mv) == (0, 0)
    assert matrix.execute("SELECT count(*) FROM ops.weekly_mv_changes").fetchone() == (0,)
    assert swap_measured(matrix, mv) != measured  # a whole rebuild is measured


def test_a_rebuild_of_the_touched_partitions_that_stops_midway_is_finished_with_nothing_lost(
    matrix: Connection, dsn: str
) -> None:
    mv = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, mv)
    past_the_last_success(matrix)
    weeks = week_partitions_with_rows(matrix)
    drivers = [
        int(row[0])
        for week in (weeks[-1], weeks[-3], weeks[-5])
        for row in matrix.execute(f"SELECT driver_id FROM ops.{week} LIMIT 2")
    ]
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = ANY(%s)", (drivers,))
    touched = sorted(partitions_holding(matrix, drivers))
    assert len(touched) >= 3, touched
    blocked = touched[0]  # rebuilt newest first: the oldest touched one goes last
    with psycopg.connect(dsn, autocommit=False) as reader:
        reader.execute(f"LOCK TABLE ops.{blocked} IN ACCESS SHARE MODE")
        failed = refresh(matrix, mv, settings=ExecutionSettings(lock_timeout_seconds=0.2, lock_retries=1))
    assert failed.result == "failure" and f"swap the rebuilt partition {blocked} in" in failed.message, failed
    first = partition_built(matrix, "ops", "weekly")
    assert {n for n, b in first.items() if b is not None} == set(touched[1:])
    # The changes it claimed are in the partitions it finished, or wait for the rest: it is finished whole.
    finished = refresh(matrix, mv)
    assert finished.result == "success" and finished.mode == "Swap", finished
    assert "a build-and-swap did not complete" in finished.reason, finished.reason
    assert finished.partitions is not None and set(finished.partitions.resumed) == set(touched[1:])
    assert mismatches(matrix, mv) == (0, 0)
    assert ours_left_beside(matrix, "weekly") == []
    assert matrix.execute("SELECT count(*) FROM ops.weekly_mv_changes").fetchone() == (0,)


def test_a_rebuild_a_partition_at_a_time_tells_its_progress_as_each_partition_is_swapped_in(
    matrix: Connection,
) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
    told: list[partitions.RebuildProgress] = []
    in_place: list[bool] = []

    def progress(step: partitions.RebuildProgress) -> None:
        told.append(step)
        # Told once the partition's swap has committed: another session already reads the new one.
        built = partition_built(matrix, "ops", "weekly")
        in_place.append(built.get(step.last) is not None)

    result = refresh(matrix, mv, progress=progress)
    assert result.result == "success" and result.partitions is not None, result
    rebuilt = result.partitions.rebuilt
    assert [step.last for step in told] == rebuilt  # in the order they were rebuilt: DEFAULT, then newest first
    assert [step.rebuilt for step in told] == list(range(1, len(rebuilt) + 1))
    assert {step.to_rebuild for step in told} == {len(rebuilt)} and all(in_place), (told, in_place)
    assert len({step.started_at for step in told}) == 1

    told.clear()
    assert refresh(matrix, mv, "Swap", progress=progress).result == "success"
    incremental = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, incremental)
    assert refresh(matrix, incremental).result == "success"  # the rebuild a newly installed capture asks for
    told.clear()
    driver = matrix.execute(f"SELECT driver_id FROM ops.{week_partitions_with_rows(matrix)[-1]} LIMIT 1").fetchone()
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = %s", driver)
    touched = refresh(matrix, incremental, progress=progress)
    assert touched.partitions is not None and touched.partitions.scope == partitions.REBUILT_TOUCHED, touched
    assert [step.last for step in told] == touched.partitions.rebuilt
    assert {step.to_rebuild for step in told} == {len(touched.partitions.rebuilt)}
    assert refresh(matrix, incremental, progress=progress).result == "skipped"  # nothing to tell
    assert [step.last for step in told] == touched.partitions.rebuilt


MOVE_A_LEAD = """
UPDATE ops.leads SET lead_date = lead_date + CASE WHEN lead_date < span.middle THEN 7 ELSE -7 END
FROM (SELECT min(lead_date) + (max(lead_date) - min(lead_date)) / 2 AS middle FROM ops.leads) AS span
WHERE driver_id = %s"""


def test_writes_during_rebuilds_of_the_touched_partitions_are_never_lost(matrix: Connection, dsn: str) -> None:
    """A writer keeps committing (claims changing, leads moving a week on or back, payments deleted) while
    Auto rebuilds the partitions each refresh's changes touch: a change committed after a claim stays in the
    log for the next refresh, whichever partitions it touches."""
    mv = weekly_view(incremental=REBUILDS)
    apply_and_record(matrix, mv)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        rng = random.Random(11)
        with psycopg.connect(dsn, autocommit=True) as writer:
            while not stop.is_set():
                driver, change = rng.randint(1, 300), rng.randrange(3)
                if change == 0:
                    status = rng.choice(["approved", "rejected"])
                    writer.execute("UPDATE ops.claims SET status = %s WHERE driver_id = %s", (status, driver))
                elif change == 1:  # a week on or back, inside the weeks the leads span (each has its partition)
                    writer.execute(MOVE_A_LEAD, (driver,))
                else:
                    writer.execute("DELETE FROM ops.payments WHERE driver_id = %s", (driver,))
                written[0] += 1
                time.sleep(0.005)  # a writer, not a flood: a claim of every key each time rebuilds every week

    thread = threading.Thread(target=write)
    thread.start()
    touched = refreshes = 0
    try:
        while touched < 5:  # each with writes committing before, during and after its claim
            result = refresh(matrix, mv)
            assert result.result in ("success", "skipped"), result
            touched += bool(result.partitions is not None and result.partitions.scope == partitions.REBUILT_TOUCHED)
            refreshes += 1
            assert refreshes < 200, "Auto never rebuilt only the touched partitions"
    finally:
        stop.set()
        thread.join()
    refresh(matrix, mv)
    assert written[0] > 50, written
    assert mismatches(matrix, mv) == (0, 0)


def test_a_skipped_refresh_reads_the_partitions_once_a_period(
    matrix: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A target-lag view looks every few seconds and mostly finds nothing to do: its maintenance read runs on
    the first look, and again only once the periods to come or the retention window move."""
    incremental = {"keyColumns": ["driver_id"], "sources": SOURCES}
    mv = weekly_view(partitioning={**WEEKLY, "retain": "26w"}, incremental=incremental)
    apply_and_record(matrix, mv)
    caplog.set_level(logging.DEBUG, logger="matview.plan.executor")
    for _ in range(4):
        assert refresh(matrix, mv).result == "skipped"
    reads = [r for r in caplog.records if "keep the partitions of ops.weekly" in r.getMessage()]
    assert len(reads) == 1, [r.getMessage() for r in caplog.records]
    changed = weekly_view(partitioning={**WEEKLY, "retain": "27w"}, incremental=incremental)
    engine.apply(matrix, changed)
    caplog.clear()
    assert refresh(matrix, changed).result in ("skipped", "success")
    assert any("keep the partitions of ops.weekly" in r.getMessage() for r in caplog.records)  # a new window


async def test_the_partitions_a_running_rebuild_has_left_are_a_gauge_back_to_zero_at_its_end(
    matrix: Connection, dsn: str
) -> None:
    """Through the runner's Refresher, as `matview run` and the operator refresh: while a rebuild a partition
    at a time runs, matview_partitions_rebuild_remaining counts down; its end puts it back to 0."""
    mv = weekly_view()
    apply_and_record(matrix, mv)
    metrics = RefreshMetrics()
    refresher = Refresher(metrics)
    labels = {"namespace": mv.namespace, "name": mv.resource_name}
    seen: list[tuple[int, float | None]] = []

    def progress(step: partitions.RebuildProgress) -> None:
        seen.append((step.to_rebuild - step.rebuilt, metrics.registry.get_sample_value(REMAINING, labels)))

    try:
        result = await refresher.refresh(dsn, mv, "Swap", progress=progress)
    finally:
        refresher.close()
    assert result.result == "success" and result.partitions is not None, result
    rebuilt = len(result.partitions.rebuilt)
    assert [left for left, _ in seen] == list(range(rebuilt - 1, -1, -1))
    assert all(gauge == left for left, gauge in seen), seen
    assert metrics.registry.get_sample_value(REMAINING, labels) == 0


REMAINING = "matview_partitions_rebuild_remaining"


def test_a_partitioned_incremental_view_whose_search_path_lists_public_calls_no_look_alike(
    matrix: Connection,
) -> None:
    """spec.searchPath lists public, where every test database has the suite's look-alikes of each function and
    operator the engine's SQL calls (tests/hostile.py): the claim of the touched periods, the key-filtered
    recompute routed to its partitions, a rebuild a partition at a time, Auto, verify and delete run under that
    search path, and the dsn fixture fails this test if any of them called a look-alike."""
    mv = weekly_view(incremental={"keyColumns": ["driver_id"], "sources": SOURCES}, searchPath=["public"])
    apply_and_record(matrix, mv)
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date - 7 WHERE driver_id IN (3, 4)")
    matrix.execute("DELETE FROM ops.payments WHERE driver_id = 12")
    verification = verify.compare(matrix, mv, ExecutionSettings())
    assert verification.matches and verification.pending_keys == 3, verification
    result = refresh(matrix, mv, "Incremental")
    assert (result.result, result.mode) == ("success", "Incremental"), result
    assert mismatches(matrix, mv) == (0, 0)
    matrix.execute("UPDATE ops.leads SET lead_date = lead_date + 7 WHERE driver_id % 10 = 0")
    result = refresh(matrix, mv, "Swap")
    assert result.result == "success" and result.partitions is not None and result.partitions.rebuilt, result
    matrix.execute("DELETE FROM ops.trips WHERE driver_id = 21")
    assert refresh(matrix, mv, "Auto").result == "success"
    assert mismatches(matrix, mv) == (0, 0)
    engine.delete(matrix, mv)
