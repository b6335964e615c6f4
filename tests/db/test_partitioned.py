"""Partitioned views (spec.partitioning, issue #25) against a real PostgreSQL: the partitions come from the
data, a rebuild keeps them named after the view, reads on the partition column are pruned, incremental
refresh routes rows, and bad declarations are refused before anything is made.

The workload is the driver-matrix example, partitioned by ``week_start`` (range) or ``origin_tag`` (list);
every check compares the stored rows with a full recompute of the same query, duplicates counted.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from matview.api.spec import MaterializedView
from matview.errors import SpecError
from matview.plan import engine, partitions
from matview.plan.observed import Connection
from matview.refresh import apply_and_record, refresh
from tests.db.test_incremental import SCHEMA_SQL, SOURCES, mismatches
from tests.helpers import view


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


def weekly_view(**overrides: Any) -> MaterializedView:
    spec = {**_spec(), "partitioning": {"column": "week_start", "by": "Range", "period": "Week", "ahead": 2}}
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


def rows_in(conn: Connection, schema: str, table: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()
    assert row is not None
    return int(row[0])


def test_a_range_partitioned_view_gets_one_partition_per_week_of_its_data_plus_ahead_and_a_default(
    matrix: Connection,
) -> None:
    mv = weekly_view()
    apply_and_record(matrix, mv)
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
    current = datetime.date.today() - datetime.timedelta(days=datetime.date.today().weekday())
    newest = max([*weeks, current])
    ahead = {newest + datetime.timedelta(days=7), newest + datetime.timedelta(days=14)}
    expected = {partitions.partition_name("weekly", partitions.range_label(w)) for w in weeks | ahead}
    assert set(found) == expected | {"weekly_p_default"}
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
    ],
)
def test_a_bad_partition_column_is_refused_naming_the_field_and_nothing_is_made(
    matrix: Connection, partitioning: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as raised:
        engine.apply(matrix, weekly_view(partitioning=partitioning))
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

    by_day = view(
        "hostile",
        schema="ops",
        name=name,
        storage="Table",
        query="SELECT tag, at FROM ops.src",
        partitioning={"column": "at", "by": "Range", "period": "Day"},
    )
    engine.apply(conn, by_day)
    found = partitions_of(conn, "ops", name)
    assert set(found) == {default, partitions.partition_name(name, "p20260304")}
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
    engine.apply(conn, daily)
    found = partitions_of(conn, "ops", "daily")
    assert set(found) == {"daily_p20260304", "daily_p20260305", "daily_p_default"}
    assert conn.execute("SELECT id FROM ops.daily_p20260304").fetchall() == [(1,)]
    assert conn.execute("SELECT id FROM ops.daily_p20260305").fetchall() == [(2,)]
    assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)  # the build's UTC ended with it
