"""The live view of an incremental view (spec.incremental.liveView): exact to the last commit inside the
reader's snapshot, for any query shape, while writers and refreshes run; kept in step with the spec."""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import psycopg
import pytest

from matview.errors import UnmanagedObjectError
from matview.plan import engine, live
from matview.plan.observed import Connection
from matview.refresh import refresh
from tests.db.roles import Roles
from tests.db.test_incremental import SCHEMA_SQL, SOURCES, apply, matrix_view, random_batch
from tests.db.test_pages import walk

LIVE = "ops.mx_live"
QUERY = "SELECT * FROM ops.v_payments_driver_matrix_cabinet"
DRIVERS = 120


def live_view(**overrides: Any) -> Any:
    """The incremental driver-matrix view of test_incremental.py, with its live view."""
    incremental = {"keyColumns": ["driver_id"], "sources": SOURCES, "liveView": True}
    return matrix_view(**{"incremental": incremental, **overrides})


@pytest.fixture
def matrix(conn: Connection) -> Connection:
    conn.execute(SCHEMA_SQL)
    conn.execute(f"SELECT ops.load_driver_matrix({DRIVERS})")
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn


def differences(conn: Connection, query: str = QUERY) -> tuple[int, int]:
    """(live rows the query does not produce, rows it produces that the live view lacks), duplicates counted,
    in one snapshot."""
    row = conn.execute(
        f"WITH l AS MATERIALIZED (SELECT * FROM {LIVE}), q AS MATERIALIZED ({query}) "
        "SELECT (SELECT count(*) FROM (SELECT * FROM l EXCEPT ALL SELECT * FROM q) a), "
        "(SELECT count(*) FROM (SELECT * FROM q EXCEPT ALL SELECT * FROM l) b)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_the_live_view_sees_a_write_at_once_and_the_table_after_a_refresh(matrix: Connection) -> None:
    mv = live_view()
    apply(matrix, mv)
    assert differences(matrix) == (0, 0)
    before = matrix.execute("SELECT trips_14d FROM ops.mx WHERE driver_id = 5").fetchone()
    matrix.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT 5, current_date - g FROM generate_series(1, 3) g"
    )
    assert differences(matrix) == (0, 0), "the live view is fresh to the last commit"
    assert matrix.execute("SELECT trips_14d FROM ops.mx WHERE driver_id = 5").fetchone() == before, "table: stale"
    matrix.execute("TRUNCATE ops.payments")  # a full rebuild is pending: the live view answers with the query
    assert differences(matrix) == (0, 0)
    assert refresh(matrix, mv).result == "success"
    assert differences(matrix) == (0, 0)
    assert matrix.execute("SELECT count(*) FROM ops.mx_mv_changes").fetchone() == (0,)


@pytest.mark.timeout(600)
def test_random_writes_the_live_view_always_equals_the_query(matrix: Connection) -> None:
    """1,000 random batches (key moves, deletes, TRUNCATE): the first 150 with no refresh at all, each
    compared (pending keys pile up); then a refresh after every fifth, compared before and after it."""
    seed = int(os.environ.get("MATVIEW_EQUIVALENCE_SEED", "20261201"))
    batches = int(os.environ.get("MATVIEW_LIVE_BATCHES", "1000"))
    rng = random.Random(seed)
    mv = live_view()
    apply(matrix, mv)
    recent: list[str] = []
    compared = refreshes = 0
    for batch in range(1, batches + 1):
        recent.append(random_batch(matrix, rng, DRIVERS))
        if batch > 150 and batch % 5:
            continue
        assert differences(matrix) == (0, 0), f"seed {seed}, batch {batch}, pending, after {recent}"
        compared += 1
        if batch > 150:
            assert refresh(matrix, mv).result in ("success", "skipped")
            refreshes += 1
            assert differences(matrix) == (0, 0), f"seed {seed}, batch {batch}, after a refresh, after {recent}"
            compared += 1
            recent = []
    assert refreshes >= 150 and compared >= 450


def test_a_reader_in_one_snapshot_sees_the_live_view_equal_the_query_during_writes_and_refreshes(
    matrix: Connection, dsn: str
) -> None:
    mv = live_view()
    apply(matrix, mv)
    stop = threading.Event()
    problems: list[str] = []
    compared = [0]

    def write() -> None:
        rng = random.Random(11)
        with psycopg.connect(dsn, autocommit=True) as writer:
            while not stop.is_set():
                random_batch(writer, rng, DRIVERS, truncate=False)  # TRUNCATE is not MVCC-safe

    def read() -> None:
        with psycopg.connect(dsn, autocommit=True) as reader:
            while not stop.is_set():
                with reader.transaction():
                    reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    found = differences(reader)
                if found != (0, 0):
                    problems.append(str(found))
                compared[0] += 1

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    try:
        refreshed = 0
        while compared[0] < 60 and not problems:
            assert refresh(matrix, mv).result in ("success", "skipped")
            refreshed += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == [], problems
    assert refreshed > 3


def test_the_live_view_follows_the_spec_and_goes_with_the_view(matrix: Connection) -> None:
    mv = live_view()
    apply(matrix, mv)
    plan = engine.plan(matrix, mv)
    assert plan.empty, plan.reasons
    changed = live_view(query="SELECT driver_id, driver_name, trips_14d FROM ops.v_payments_driver_matrix_cabinet")
    result = apply(matrix, changed)
    assert any("another definition" in r for r in result.plan.reasons) or result.changed
    assert differences(matrix, changed.query.text) == (0, 0)
    columns = matrix.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'mx_live'").fetchone()
    assert columns == (3,)
    off = live_view(
        query=changed.query.text,
        incremental={
            "keyColumns": ["driver_id"],
            "liveView": False,
            "sources": [
                {"table": "ops.trips", "columns": ["driver_id"]},
                {"table": "public.drivers", "columns": ["driver_id"]},
            ],
        },
    )
    apply(matrix, off)
    assert matrix.execute("SELECT to_regclass('ops.mx_live')").fetchone() == (None,)
    apply(matrix, changed)
    assert differences(matrix, changed.query.text) == (0, 0)
    engine.delete(matrix, live_view(query=changed.query.text, deletionPolicy="Retain"))
    assert matrix.execute("SELECT to_regclass('ops.mx_live'), to_regclass('ops.mx') IS NOT NULL").fetchone() == (
        None,
        True,
    )


def test_keyset_pages_read_the_live_view_by_its_tables_key(matrix: Connection, dsn: str) -> None:
    mv = live_view(indexes=[{"columns": ["driver_id"], "unique": True}])
    apply(matrix, mv)
    matrix.execute("UPDATE ops.trips SET trip_date = trip_date + 1 WHERE driver_id % 10 = 3")
    with psycopg.connect(dsn, autocommit=True) as reader:
        seen, _ = walk(reader, 37, ("ops", "mx_live"), order=["driver_id"])
    expected = [r[0] for r in matrix.execute(f"SELECT driver_id FROM ({QUERY}) q ORDER BY 1")]
    assert seen == expected


def test_a_look_alike_holding_the_live_views_name_is_refused(matrix: Connection) -> None:
    matrix.execute("CREATE VIEW ops.mx_live AS SELECT 1 AS one")
    with pytest.raises(UnmanagedObjectError, match="mx_live"):
        engine.apply(matrix, live_view())
    assert live.name(live_view()) == "mx_live"


def test_pages_of_the_live_view_stay_exact_when_pending_keys_vanish_or_appear(matrix: Connection, dsn: str) -> None:
    """A live page is bounded by the stored table first; drivers deleted since the last refresh leave fewer
    live rows under that bound, and new ones add rows the table lacks: forward and backward walks still give
    every row of the query exactly once, in order."""
    mv = live_view(indexes=[{"columns": ["driver_id"], "unique": True}])
    apply(matrix, mv)
    gone = "driver_id BETWEEN 20 AND 60"  # more than a page and its slack, in the middle of the walk
    for table in ("ops.payments", "ops.claims", "ops.trips", "ops.leads", "public.drivers"):
        matrix.execute(f"DELETE FROM {table} WHERE {gone}")
    matrix.execute(
        "INSERT INTO public.drivers (driver_id, driver_name, created_at) "
        "VALUES (1000, 'new', current_date), (1001, 'newer', current_date)"
    )
    matrix.execute(
        "INSERT INTO ops.leads (lead_id, driver_id, origin_tag, lead_date) "
        "VALUES (-1, 1000, 'web', current_date), (-2, 1001, 'web', current_date)"
    )
    expected = [r[0] for r in matrix.execute(f"SELECT driver_id FROM ({QUERY}) q ORDER BY 1")]
    assert 1000 in expected and 40 not in expected
    with psycopg.connect(dsn, autocommit=True) as reader:
        forward, backward = walk(reader, 7, ("ops", "mx_live"), order=["driver_id"])
    assert forward == expected
    assert backward == expected


def test_the_live_views_function_runs_only_for_the_roles_granted_on_the_view(matrix: Connection, dsn: str) -> None:
    """The function computes rows as the view's builder (SECURITY DEFINER): a role not granted on the view
    may not call it to read around the grants; a granted one reads the live view."""
    roles = Roles(dsn)
    for name in ("reader", "stranger"):
        matrix.execute(f"CREATE ROLE {roles[name]} LOGIN")
    try:
        matrix.execute(f"GRANT USAGE ON SCHEMA ops TO {roles['reader']}, {roles['stranger']}")
        apply(matrix, live_view(grants=[{"role": roles["reader"]}]))
        matrix.execute("UPDATE ops.trips SET trip_date = trip_date + 1 WHERE driver_id = 7")
        with psycopg.connect(roles.login("reader"), autocommit=True) as reader:
            rows = reader.execute("SELECT driver_id FROM ops.mx_live WHERE driver_id = 7").fetchall()
            assert rows and all(row == (7,) for row in rows)
        with psycopg.connect(roles.login("stranger"), autocommit=True) as stranger:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                stranger.execute("SELECT * FROM ops.mx_live_rows(7)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                stranger.execute("SELECT * FROM ops.mx_live WHERE driver_id = 7")
    finally:
        engine.delete(matrix, live_view(deletionPolicy="Delete"))
        roles.drop(matrix, "reader", "stranger")


def test_a_look_alike_function_holding_the_live_functions_name_is_refused(matrix: Connection, dsn: str) -> None:
    """A role that may create in the schema plants the function the live view would call: apply refuses,
    naming it and its owner, and neither replaces nor calls it."""
    roles = Roles(dsn)
    matrix.execute(f"CREATE ROLE {roles['planter']}")
    try:
        matrix.execute(f"GRANT CREATE, USAGE ON SCHEMA ops TO {roles['planter']}")
        matrix.execute(f"SET ROLE {roles['planter']}")
        matrix.execute("CREATE FUNCTION ops.mx_live_rows(bigint) RETURNS SETOF int LANGUAGE sql AS 'SELECT 1'")
        matrix.execute("RESET ROLE")
        with pytest.raises(UnmanagedObjectError, match=r"function ops\.mx_live_rows exists and is not managed"):
            engine.apply(matrix, live_view())
        assert matrix.execute("SELECT to_regclass('ops.mx_live')").fetchone() == (None,)
        owner = matrix.execute(
            "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = 'mx_live_rows'"
        ).fetchone()
        assert owner == (roles["planter"],)
    finally:
        matrix.execute("RESET ROLE")
        roles.drop(matrix, "planter")


def test_a_query_reading_a_column_named_like_a_plpgsql_variable_works(matrix: Connection) -> None:
    """The function is PL/pgSQL, which declares FOUND: the query's own column of that name still wins."""
    query = (
        "SELECT driver_id, found, trips_14d FROM (SELECT driver_id, driver_name AS found, trips_14d "
        "FROM ops.v_payments_driver_matrix_cabinet) s WHERE found IS NOT NULL"
    )
    apply(matrix, live_view(query=query))
    matrix.execute("UPDATE public.drivers SET driver_name = 'renamed' WHERE driver_id = 3")
    assert differences(matrix, query) == (0, 0)
    assert matrix.execute("SELECT found FROM ops.mx_live WHERE driver_id = 3").fetchone() == ("renamed",)


@pytest.mark.parametrize("region_type", ["varchar(8)", "shop.code"])
def test_a_two_column_key_of_a_varchar_and_an_enum_is_applied_and_read_live(conn: Connection, region_type: str) -> None:
    """A key of types pg_catalog has no exact ``=`` for (varchar compares as text, an enum with anyenum's):
    the engine's key matches, written ``OPERATOR(pg_catalog.=)`` (row-wise for the live view, ``= ANY`` for the
    claim and the filter), find those by coercion, as ``IN`` and ``=`` did unqualified. shop.code, a domain over
    varchar, has no operator class of its own nor of its base type: it compares as text too (it was refused as a
    key that cannot be hashed)."""
    from tests.helpers import view

    conn.execute(f"""
        CREATE SCHEMA shop;
        CREATE TYPE shop.tier AS ENUM ('s1', 's2', 's3', 's4');
        CREATE DOMAIN shop.code AS varchar(8);
        CREATE TABLE shop.sales (region {region_type} NOT NULL, store shop.tier NOT NULL, amount int NOT NULL);
        INSERT INTO shop.sales SELECT 'r' || g % 3, ('s' || 1 + g % 4)::shop.tier, g FROM generate_series(1, 60) g;
    """)
    query = "SELECT region, store, sum(amount) AS total FROM shop.sales GROUP BY region, store"
    mv = view(
        "by-store",
        schema="shop",
        name="by_store",
        storage="Table",
        query=query,
        indexes=[{"columns": ["region", "store"], "unique": True}],
        incremental={
            "keyColumns": ["region", "store"],
            "sources": [{"table": "shop.sales", "columns": ["region", "store"]}],
            "liveView": True,
        },
    )
    apply(conn, mv)
    conn.execute("UPDATE shop.sales SET amount = amount + 1000 WHERE region = 'r1' AND store = 's2'")
    conn.execute("UPDATE shop.sales SET store = 's4' WHERE region = 'r2' AND store = 's3'")  # a key moves
    expected = sorted(conn.execute(query).fetchall())
    assert sorted(conn.execute("SELECT * FROM shop.by_store_live").fetchall()) == expected
    result = refresh(conn, mv, "Incremental")
    assert (result.result, result.keys_applied) == ("success", 3), result
    assert sorted(conn.execute("SELECT * FROM shop.by_store").fetchall()) == expected
