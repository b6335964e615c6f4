"""Incremental refresh against a real PostgreSQL: table storage, change capture, key-filtered recompute.

The workload is the driver-matrix example (a view over six views, 8 CTEs and a FULL OUTER JOIN): every
check compares the stored rows with a full recompute of the same query, both directions, duplicates
counted.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import psycopg
import pytest

from matview.api.spec import MaterializedView
from matview.errors import SpecError
from matview.plan import capture, engine
from matview.plan.catalog import Connection
from matview.refresh import record_build, refresh
from tests.helpers import view

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_SQL = (ROOT / "sql/examples/driver_matrix/schema.sql").read_text()
SOURCES = [
    {"table": "public.drivers", "columns": ["driver_id"]},
    {"table": "ops.leads", "columns": ["driver_id"]},
    {"table": "ops.trips", "columns": ["driver_id"]},
    {"table": "ops.claims", "columns": ["driver_id"]},
    {"table": "ops.payments", "columns": ["driver_id"]},
]


def matrix_view(**overrides: Any) -> MaterializedView:
    spec: dict[str, Any] = {
        "schema": "ops",
        "name": "mx",
        "storage": "Table",
        "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
        "indexes": [{"columns": ["driver_id"], "unique": True}],
        "incremental": {"keyColumns": ["driver_id"], "sources": SOURCES},
        "refresh": {"interval": "1m"},
    }
    spec.update(overrides)
    return view("mx", **spec)


@pytest.fixture
def matrix(conn: Connection) -> Connection:
    conn.execute(SCHEMA_SQL)
    conn.execute("SELECT ops.load_driver_matrix(300)")
    conn.execute("SELECT pg_stat_force_next_flush()")  # write counters feed the untracked-tables fingerprint
    return conn


def apply(conn: Connection, mv: MaterializedView) -> engine.ApplyResult:
    """Apply as the CLI and the operator do: a build counts as a refresh."""
    result = engine.apply(conn, mv)
    if result.built:
        record_build(conn, mv)
    return result


def mismatches(conn: Connection, mv: MaterializedView) -> tuple[int, int]:
    """(rows stored but not computed, rows computed but not stored), duplicates counted."""
    stored = f"SELECT * FROM {mv.schema}.{mv.name}"
    computed = mv.query.text
    extra = conn.execute(f"SELECT count(*) FROM ({stored} EXCEPT ALL {computed}) d").fetchone()
    missing = conn.execute(f"SELECT count(*) FROM ({computed} EXCEPT ALL {stored}) d").fetchone()
    assert extra is not None and missing is not None
    return int(extra[0]), int(missing[0])


def test_apply_builds_a_table_with_capture_and_a_refresh_applies_only_changed_keys(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    relkind = matrix.execute("SELECT relkind FROM pg_class WHERE oid = 'ops.mx'::regclass").fetchone()
    assert relkind == ("r",)
    triggers = matrix.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s", (capture.trigger_prefix(mv) + "%",)
    ).fetchone()
    assert triggers == (4 * len(SOURCES),)
    assert mismatches(matrix, mv) == (0, 0)
    assert apply(matrix, mv).changed is False  # converged: a second apply does nothing

    first = refresh(matrix, mv)
    assert first.result == "skipped" and first.reason == "no changes pending", first

    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 1 FROM ops.leads WHERE driver_id IN (3, 7)")
    matrix.execute("UPDATE ops.claims SET status = 'rejected' WHERE driver_id = 11")
    matrix.execute("DELETE FROM ops.payments WHERE driver_id = 12")
    matrix.execute("UPDATE ops.leads SET driver_id = 5000 WHERE driver_id = 13")  # a key moves: both recorded
    assert mismatches(matrix, mv) != (0, 0)

    result = refresh(matrix, mv)
    assert result.result == "success", result
    assert result.mode == "Incremental", result
    assert result.keys_applied == 6  # 3, 7, 11, 12, and 13 moved to 5000
    assert result.staleness_seconds == 0
    assert mismatches(matrix, mv) == (0, 0)


def test_truncate_forces_a_full_rebuild_that_says_why(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("TRUNCATE ops.payments")
    result = refresh(matrix, mv)
    assert result.result == "success" and result.mode == "Swap", result
    assert "TRUNCATE of ops.payments" in result.reason
    assert mismatches(matrix, mv) == (0, 0)
    assert refresh(matrix, mv).reason == "no changes pending"


def test_many_changed_keys_rebuild_in_full_and_mode_incremental_does_not(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("UPDATE public.drivers SET driver_name = driver_name || '!' WHERE driver_id % 5 = 0")  # 20 %
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "fullRebuildRatio" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)
    forced = matrix_view(refresh={"interval": "1m", "mode": "Incremental"})
    matrix.execute("UPDATE public.drivers SET driver_name = driver_name || '?' WHERE driver_id % 5 = 0")
    result = refresh(matrix, forced)
    assert result.mode == "Incremental" and result.keys_applied == 60, result
    assert mismatches(matrix, mv) == (0, 0)


def test_a_dropped_trigger_is_restored_by_apply_and_forces_a_full_rebuild(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    name = capture.trigger_names(mv)["UPDATE"]
    matrix.execute(f'DROP TRIGGER "{name}" ON ops.trips')
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date - 30 WHERE driver_id = 4")  # not captured
    plan = engine.plan(matrix, mv)
    assert any("ops.trips are missing" in reason for reason in plan.reasons), plan.reasons
    apply(matrix, mv)
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "capture was missing on ops.trips" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)


def test_writes_to_an_undeclared_table_rebuild_in_full(matrix: Connection) -> None:
    partial = [s for s in SOURCES if s["table"] != "public.drivers"]
    mv = matrix_view(incremental={"keyColumns": ["driver_id"], "sources": partial})
    apply(matrix, mv)
    matrix.execute("UPDATE public.drivers SET driver_name = 'renamed' WHERE driver_id = 2")
    matrix.execute("SELECT pg_stat_force_next_flush()")
    result = refresh(matrix, mv)
    assert result.mode == "Swap" and "not a declared source" in result.reason, result
    assert mismatches(matrix, mv) == (0, 0)


def test_wrong_declarations_are_refused_before_any_change(matrix: Connection) -> None:
    cases = {
        "spec.incremental.keyColumns[0]": {"keyColumns": ["nope"], "sources": SOURCES},
        "spec.incremental.sources[0].columns[0]": {
            "keyColumns": ["driver_id"],
            "sources": [{"table": "ops.trips", "columns": ["nope"]}],
        },
        "spec.incremental.sources[0].table": {
            "keyColumns": ["driver_id"],
            "sources": [{"table": "ops.nothing", "columns": ["driver_id"]}],
        },
    }
    matrix.execute("CREATE TABLE ops.unrelated (driver_id bigint)")
    cases["spec.incremental.sources[1].table"] = {
        "keyColumns": ["driver_id"],
        "sources": [SOURCES[0], {"table": "ops.unrelated", "columns": ["driver_id"]}],
    }
    for field, incremental in cases.items():
        with pytest.raises(SpecError) as caught:
            engine.apply(matrix, matrix_view(incremental=incremental))
        assert field in [e.path for e in caught.value.errors], (field, caught.value)
        exists = matrix.execute("SELECT to_regclass('ops.mx'), to_regclass('ops.mx_mv_changes')").fetchone()
        assert exists == (None, None)


def test_plan_shows_the_key_filtered_query(matrix: Connection) -> None:
    from matview.plan.catalog import resolve_relations
    from matview.plan.planner import key_filtered_query

    mv = matrix_view()
    result = key_filtered_query(mv, resolve_relations(matrix, mv))
    assert result.filtered == {("public", "drivers"), ("ops", "leads"), ("ops", "trips"), ("ops", "claims"), ("ops", "payments")}
    assert ("ops", "v_payments_driver_matrix_cabinet") in result.inlined
    assert result.query.text.count("pg_temp.matview_changed_keys") >= 5


def test_delete_removes_capture_even_when_the_data_is_retained(matrix: Connection) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    engine.delete(matrix, mv)
    left = matrix.execute(
        "SELECT to_regclass('ops.mx') IS NOT NULL, to_regclass('ops.mx_mv_changes'), "
        "(SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s)",
        (capture.trigger_prefix(mv) + "%",),
    ).fetchone()
    assert left == (True, None, 0)
    matrix.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (1, '2026-01-01')")  # writers unaffected


def test_writers_need_no_privilege_on_the_change_log(matrix: Connection, dsn: str) -> None:
    mv = matrix_view()
    apply(matrix, mv)
    matrix.execute("CREATE ROLE writer LOGIN PASSWORD 'w'; GRANT USAGE ON SCHEMA ops TO writer")
    matrix.execute("GRANT INSERT, SELECT ON ops.trips TO writer")
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.update(user="writer", password="w")
    with psycopg.connect(**info, autocommit=True) as writer:
        writer.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-02-01')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            writer.execute("SELECT * FROM ops.mx_mv_changes")
    result = refresh(matrix, mv)
    assert result.mode == "Incremental" and result.keys_applied == 1, result
    assert mismatches(matrix, mv) == (0, 0)
