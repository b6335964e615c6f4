"""The engine against a real PostgreSQL: create, converge, repair, swap, refuse, delete."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from matview.api.spec import MaterializedView
from matview.errors import DependentObjectsError, SpecError, UnmanagedObjectError
from matview.plan import engine
from matview.plan.executor import LOCK_TABLE, ExecutionSettings, lock_key
from matview.plan.observed import Connection
from tests.db.catalog_helpers import can_select, index_def, index_names, is_matview, relations
from tests.helpers import view

BASE = """
CREATE SCHEMA ops;
CREATE TABLE ops.trips (id int PRIMARY KEY, driver_id int NOT NULL, origin_tag text NOT NULL,
                        amount numeric NOT NULL, pending bool NOT NULL);
INSERT INTO ops.trips SELECT g, g % 50, 'tag' || (g % 5), g * 1.5, g % 3 = 0 FROM generate_series(1, 2000) g;
CREATE ROLE app_reader;
"""

QUERY = (
    "SELECT driver_id, origin_tag, count(*) AS trips, sum(amount) AS amount, bool_or(pending) AS only_pending "
    "FROM ops.trips GROUP BY driver_id, origin_tag"
)


@pytest.fixture
def base(conn: Connection) -> Connection:
    conn.execute(BASE)
    return conn


@pytest.fixture(autouse=True)
def _drop_test_roles(pg_server: Any) -> Any:
    yield
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        for role in ("app_reader", "Report Reader", "other_owner"):
            admin.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(role)))


def matrix(**spec: Any) -> MaterializedView:
    body: dict[str, Any] = {
        "schema": "ops",
        "query": QUERY,
        "indexes": [
            {"columns": ["driver_id", "origin_tag"], "unique": True},
            {"columns": ["origin_tag"]},
            {"columns": ["driver_id"], "where": "only_pending", "name": "pending_drivers"},
        ],
        "grants": [{"role": "app_reader"}],
        "deletionPolicy": "Delete",
    }
    body.update(spec)
    return view("driver-matrix", "ops", **body)


def test_create_then_second_apply_changes_nothing(base: Connection) -> None:
    v = matrix()
    result = engine.apply(base, v)
    assert result.changed
    assert is_matview(base, "ops", "driver_matrix")
    names = index_names(base, "ops", "driver_matrix")
    assert names == {v.index_name(i) for i in v.indexes}
    assert "WHERE only_pending" in index_def(base, "ops", "pending_drivers")
    assert "UNIQUE" in index_def(base, "ops", v.index_name(v.indexes[0]))
    assert can_select(base, "app_reader", "ops", "driver_matrix")
    row = base.execute("SELECT count(*), sum(trips) FROM ops.driver_matrix").fetchone()
    assert row == (50, 2000)  # origin_tag (g % 5) is determined by driver_id (g % 50)
    second = engine.apply(base, v)
    assert not second.changed
    assert engine.plan(base, v).empty


def test_index_add_drop_and_change(base: Connection) -> None:
    engine.apply(base, matrix())
    changed = matrix(
        indexes=[
            {"columns": ["driver_id", "origin_tag"], "unique": True},
            {"columns": ["trips"], "method": "brin"},
            {"columns": ["origin_tag"], "where": "only_pending", "name": "pending_drivers"},
        ]
    )
    before = relations(base)
    result = engine.apply(base, changed)
    assert result.changed
    assert index_names(base, "ops", "driver_matrix") == {changed.index_name(i) for i in changed.indexes}
    assert "USING brin (trips)" in index_def(base, "ops", changed.index_name(changed.indexes[1]))
    assert "(origin_tag) WHERE only_pending" in index_def(base, "ops", "pending_drivers")
    assert ("ops", matrix().index_name(matrix().indexes[1]), "i") in before
    assert engine.plan(base, changed).empty


def test_hand_dropped_index_and_revoked_grant_come_back(base: Connection) -> None:
    v = matrix()
    engine.apply(base, v)
    base.execute('DROP INDEX ops."pending_drivers"')
    base.execute("REVOKE SELECT ON ops.driver_matrix FROM app_reader")
    base.execute("GRANT SELECT, DELETE ON ops.driver_matrix TO PUBLIC")
    plan = engine.plan(base, v)
    assert "index pending_drivers is missing" in plan.reasons
    assert "grants differ from the spec" in plan.reasons
    engine.apply(base, v)
    assert "pending_drivers" in index_names(base, "ops", "driver_matrix")
    assert can_select(base, "app_reader", "ops", "driver_matrix")
    base.execute("CREATE ROLE other_owner")
    assert not can_select(base, "other_owner", "ops", "driver_matrix")
    assert engine.plan(base, v).empty


def test_hand_made_index_on_the_view_is_left_alone(base: Connection) -> None:
    v = matrix()
    engine.apply(base, v)
    base.execute("CREATE INDEX dba_extra ON ops.driver_matrix (amount)")
    assert engine.plan(base, v).empty
    assert "dba_extra" in index_names(base, "ops", "driver_matrix")


def test_source_drift_rebuilds_with_the_new_shape(base: Connection) -> None:
    base.execute("CREATE VIEW ops.trips_v AS SELECT id, driver_id FROM ops.trips")
    v = view(
        "by-id", "ops", schema="ops", query="SELECT * FROM ops.trips_v", indexes=[{"columns": ["id"], "unique": True}]
    )
    engine.apply(base, v)
    base.execute("CREATE OR REPLACE VIEW ops.trips_v AS SELECT id, driver_id, origin_tag FROM ops.trips")
    plan = engine.plan(base, v)
    assert plan.reasons == ("source columns changed: +origin_tag text",)
    engine.apply(base, v)
    columns = [
        r[0]
        for r in base.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'ops.by_id'::regclass AND attnum > 0 ORDER BY attnum"
        )
    ]
    assert columns == ["id", "driver_id", "origin_tag"]
    assert engine.plan(base, v).empty


def test_query_change_swaps_while_a_reader_keeps_reading(base: Connection, dsn: str) -> None:
    base.execute("CREATE FUNCTION ops.slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(1.5)'")
    engine.apply(base, matrix())
    old_total = base.execute("SELECT sum(amount) FROM ops.driver_matrix").fetchone()
    slow_query = QUERY.replace("sum(amount)", "sum(amount) * max(s.one)").replace(
        "FROM ops.trips", "FROM ops.trips, (SELECT ops.slow_one() AS one) s"
    )
    changed = matrix(query=slow_query.replace("* max(s.one)", "* max(s.one) * 2"))
    errors: list[BaseException] = []
    totals: list[tuple[float, object]] = []
    stop = threading.Event()

    def reader() -> None:
        with psycopg.connect(dsn, autocommit=True) as reader_conn:
            while not stop.is_set():
                try:
                    row = reader_conn.execute("SELECT sum(amount) FROM ops.driver_matrix").fetchone()
                    totals.append((time.monotonic(), row[0] if row else None))
                except psycopg.Error as exc:
                    errors.append(exc)
                time.sleep(0.01)

    def reads_after(moment: float) -> None:
        deadline = time.monotonic() + 60
        while not any(at > moment for at, _ in totals) and not errors:
            assert thread.is_alive() and time.monotonic() < deadline, "the reader stopped reading"
            time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    reads_after(0.0)  # the reader is reading before the swap starts
    started = time.monotonic()
    try:
        engine.apply(base, changed)
    finally:
        finished = time.monotonic()
        reads_after(finished)  # and reads the new copy after it
        stop.set()
        thread.join()
    assert errors == []
    new_total = base.execute("SELECT sum(amount) FROM ops.driver_matrix").fetchone()
    assert new_total is not None and old_total is not None and new_total[0] == old_total[0] * 2
    during = [t for t in totals if started < t[0] < finished]
    # The build took over a second; the reader was served throughout, always a whole old or new copy.
    assert len(during) > 10
    assert {value for _, value in totals} <= {old_total[0], new_total[0]}
    assert engine.plan(base, changed).empty
    assert not any(name.endswith(("_mv_staging", "_mv_retired")) for _, name, _ in relations(base))


def test_dependent_views_survive_a_swap_with_grants_and_comments(base: Connection) -> None:
    engine.apply(base, matrix())
    base.execute(
        "CREATE VIEW ops.report AS SELECT origin_tag, sum(amount) AS amount FROM ops.driver_matrix GROUP BY origin_tag;"
        "CREATE VIEW ops.report_top WITH (security_barrier = true) AS SELECT * FROM ops.report WHERE amount > 0;"
        "GRANT SELECT ON ops.report, ops.report_top TO app_reader;"
        "COMMENT ON VIEW ops.report IS 'used by finance';"
    )
    engine.apply(base, matrix(query=QUERY.replace("sum(amount)", "sum(amount) * 10")))
    assert base.execute("SELECT count(*) FROM ops.report_top").fetchone() == (5,)
    assert can_select(base, "app_reader", "ops", "report")
    assert can_select(base, "app_reader", "ops", "report_top")
    assert base.execute("SELECT obj_description('ops.report'::regclass)").fetchone() == ("used by finance",)
    assert base.execute("SELECT reloptions FROM pg_class WHERE oid = 'ops.report_top'::regclass").fetchone() == (
        ["security_barrier=true"],
    )
    total = base.execute("SELECT sum(amount) FROM ops.report").fetchone()
    assert total is not None and float(total[0]) == 2001 * 2000 * 1.5 / 2 * 10


def test_dependent_materialized_view_stops_the_swap_and_changes_nothing(base: Connection) -> None:
    engine.apply(base, matrix())
    base.execute("CREATE MATERIALIZED VIEW ops.rollup AS SELECT count(*) FROM ops.driver_matrix")
    before = relations(base)
    with pytest.raises(DependentObjectsError, match=r"ops\.rollup"):
        engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) + 1")))
    assert relations(base) == before


@pytest.mark.parametrize(
    "existing",
    [
        "CREATE TABLE ops.driver_matrix (id int)",
        "CREATE VIEW ops.driver_matrix AS SELECT 1 AS one",
        "CREATE MATERIALIZED VIEW ops.driver_matrix AS SELECT 1 AS one",
        "CREATE MATERIALIZED VIEW ops.driver_matrix AS SELECT 1 AS one; COMMENT ON MATERIALIZED VIEW "
        "ops.driver_matrix IS "
        '\'{"managedBy": "matview.dev", "owner": "other/resource", "kind": "view", "digest": "x"}\'',
    ],
)
def test_objects_of_others_are_never_touched(base: Connection, existing: str) -> None:
    base.execute(existing)
    before = relations(base)
    with pytest.raises(UnmanagedObjectError, match="not managed by this resource"):
        engine.apply(base, matrix())
    with pytest.raises(UnmanagedObjectError):
        engine.delete(base, matrix())
    assert relations(base) == before


def test_index_name_taken_by_someone_else_is_refused(base: Connection) -> None:
    base.execute("CREATE INDEX pending_drivers ON ops.trips (id)")
    before = relations(base)
    with pytest.raises(UnmanagedObjectError, match=r"ops\.pending_drivers"):
        engine.apply(base, matrix())
    assert relations(base) == before


def test_failure_inside_create_leaves_no_partial_objects(base: Connection) -> None:
    # (origin_tag) alone is not unique: the unique index fails after the view was created in the same transaction.
    v = matrix(indexes=[{"columns": ["driver_id"]}, {"columns": ["origin_tag"], "unique": True}])
    before = relations(base)
    with pytest.raises(engine.MatviewError, match="could not create unique index"):
        engine.apply(base, v)
    assert relations(base) == before


def test_deletion_policies(base: Connection) -> None:
    retained = matrix(deletionPolicy="Retain", supportingIndexes=[{"table": "ops.trips", "columns": ["driver_id"]}])
    engine.apply(base, retained)
    result = engine.delete(base, retained)
    assert not result.changed
    assert is_matview(base, "ops", "driver_matrix")
    deleted = matrix(supportingIndexes=[{"table": "ops.trips", "columns": ["driver_id"]}])
    base.execute("CREATE VIEW ops.reader AS SELECT * FROM ops.driver_matrix")
    with pytest.raises(DependentObjectsError, match="never uses CASCADE"):
        engine.delete(base, deleted)
    assert is_matview(base, "ops", "driver_matrix")
    base.execute("DROP VIEW ops.reader")
    engine.delete(base, deleted)
    assert not is_matview(base, "ops", "driver_matrix")
    assert index_names(base, "ops", "trips") == {"trips_pkey"}
    assert not engine.delete(base, deleted).changed


def test_quoted_reserved_and_mixed_case_names_round_trip(conn: Connection) -> None:
    conn.execute(
        'CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."Orders" ("order" int, "Select" text, "ü-x" int);'
        'INSERT INTO "My Schema"."Orders" SELECT g, \'s\' || g, g FROM generate_series(1, 10) g;'
        'CREATE ROLE "Report Reader"'
    )
    v = view(
        "order-summary",
        "ops",
        schema="My Schema",
        name="Order Summary",
        query='SELECT "order", "Select", "ü-x" FROM "My Schema"."Orders"',
        indexes=[
            {"columns": ["order"], "unique": True, "name": 'weird "index" name'},
            {"columns": ["Select", "ü-x"], "where": '"order" > 2'},
        ],
        supportingIndexes=[{"table": '"My Schema"."Orders"', "columns": ["Select"]}],
        grants=[{"role": "Report Reader"}],
        deletionPolicy="Delete",
    )
    engine.apply(conn, v)
    assert is_matview(conn, "My Schema", "Order Summary")
    assert 'weird "index" name' in index_names(conn, "My Schema", "Order Summary")
    assert can_select(conn, "Report Reader", "My Schema", "Order Summary")
    assert conn.execute('SELECT count(*) FROM "My Schema"."Order Summary"').fetchone() == (10,)
    assert engine.plan(conn, v).empty
    engine.delete(conn, v)
    assert not is_matview(conn, "My Schema", "Order Summary")
    assert index_names(conn, "My Schema", "Orders") == set()


def test_supporting_indexes_build_concurrently_and_follow_the_spec(base: Connection) -> None:
    v = matrix(
        supportingIndexes=[
            {"table": "ops.trips", "columns": ["origin_tag", "driver_id"]},
            {"table": "ops.trips", "columns": ["driver_id"], "where": "pending"},
        ]
    )
    engine.apply(base, v)
    assert index_names(base, "ops", "trips") == {"trips_pkey", *(v.index_name(i) for i in v.supporting_indexes)}
    assert engine.plan(base, v).empty
    fewer = matrix(supportingIndexes=[{"table": "ops.trips", "columns": ["origin_tag", "driver_id"]}])
    engine.apply(base, fewer)
    assert index_names(base, "ops", "trips") == {"trips_pkey", fewer.index_name(fewer.supporting_indexes[0])}


def test_supporting_index_on_a_view_is_refused_with_advice(base: Connection) -> None:
    base.execute("CREATE VIEW ops.trips_v AS SELECT * FROM ops.trips")
    before = relations(base)
    with pytest.raises(SpecError) as caught:
        engine.apply(base, matrix(supportingIndexes=[{"table": "ops.trips_v", "columns": ["driver_id"]}]))
    assert caught.value.errors[0].path == "spec.supportingIndexes[0].table"
    assert "index the base tables" in caught.value.errors[0].message
    assert relations(base) == before


def test_invalid_supporting_index_left_by_a_failed_build_is_rebuilt(base: Connection) -> None:
    v = matrix(supportingIndexes=[{"table": "ops.trips", "columns": ["origin_tag"], "unique": True}])
    with pytest.raises(engine.MatviewError):
        engine.apply(base, v)  # origin_tag is not unique: the concurrent build fails
    assert index_names(base, "ops", "trips") == {"trips_pkey"}  # the failed, INVALID index was cleaned up
    base.execute("DELETE FROM ops.trips WHERE id > 5")
    engine.apply(base, v)
    assert v.index_name(v.supporting_indexes[0]) in index_names(base, "ops", "trips")


def test_swap_waits_for_a_long_reader_with_lock_timeout_and_retries(base: Connection, dsn: str) -> None:
    engine.apply(base, matrix())
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT count(*) FROM ops.driver_matrix")  # holds ACCESS SHARE until rollback
    settings = ExecutionSettings(lock_timeout_seconds=0.05, lock_retries=3, backoff_seconds=0.01)
    try:
        with pytest.raises(engine.MatviewError, match="lock timeout"):
            engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) * 2")), settings)
        assert not any(name.endswith(("_mv_staging", "_mv_retired")) for _, name, _ in relations(base))
        assert base.execute("SELECT max(trips) FROM ops.driver_matrix").fetchone() == (40,)
    finally:
        blocker.close()
    engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) * 2")), settings)
    assert base.execute("SELECT max(trips) FROM ops.driver_matrix").fetchone() == (80,)


def test_two_appliers_never_interleave(base: Connection, dsn: str) -> None:
    v = matrix()
    with engine.connect(dsn) as other, engine.view_lock(other, v), pytest.raises(engine.BusyError):
        engine.apply(base, v)
    assert engine.apply(base, v).changed


def test_a_release_that_fails_once_still_frees_the_view(base: Connection, dsn: str) -> None:
    """Its first DELETE fails (here in the transaction an error left failed; in the operator, a cancelled task's
    cancel request landing on it): the second, after the rollback, releases the view."""
    v = matrix()
    engine.apply(base, v)
    with engine.connect(dsn) as holder:
        with engine.view_lock(holder, v):
            holder.execute("BEGIN")
            with pytest.raises(psycopg.errors.DivisionByZero):
                holder.execute("SELECT 1 / 0")
        assert not holder.closed
        engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) * 2")))  # not busy


def test_a_release_that_cannot_run_ends_its_session_and_so_frees_the_view(base: Connection, dsn: str) -> None:
    """Another session keeps the lock's row locked, so both DELETEs fail (lock_timeout): the holder's session
    ends, and a lock whose holder's session has ended holds nothing."""
    v = matrix()
    engine.apply(base, v)
    blocker = psycopg.connect(dsn)
    try:
        with engine.connect(dsn) as holder:
            holder.execute("SET lock_timeout = '50ms'")
            with engine.view_lock(holder, v):
                blocker.execute(
                    psycopg.sql.SQL("SELECT 1 FROM {} WHERE relation = %s FOR UPDATE").format(
                        psycopg.sql.Identifier("ops", LOCK_TABLE)
                    ),
                    (lock_key(v),),
                )
            assert holder.closed
        blocker.rollback()
        engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) * 2")))  # not busy
    finally:
        blocker.close()


def test_only_create_and_swap_count_as_building_the_data(base: Connection) -> None:
    created = engine.apply(base, matrix())
    assert created.built
    assert not engine.apply(base, matrix()).built
    more = matrix(
        indexes=[
            {"columns": ["driver_id", "origin_tag"], "unique": True},
            {"columns": ["origin_tag"]},
            {"columns": ["driver_id"], "where": "only_pending", "name": "pending_drivers"},
            {"columns": ["amount"]},
        ]
    )
    indexed = engine.apply(base, more)
    assert indexed.changed and not indexed.built  # a new index is not fresh data: the schedule must not move
    assert engine.apply(base, matrix(query=QUERY.replace("count(*)", "count(*) + 0"))).built


def test_first_applies_in_a_new_schema_at_once_all_succeed(conn: Connection, dsn: str) -> None:
    """The first apply in a schema creates its lock and versions tables; several at the same moment race to
    create them (CREATE TABLE IF NOT EXISTS can still fail on the table's row type, or its name, made by the
    other): every one of them must succeed. Found by the operator's test of a hostile neighbour."""
    conn.execute("CREATE TABLE public.numbers AS SELECT g AS n FROM generate_series(1, 10) g")
    failures: list[BaseException] = []
    for round_ in range(8):
        schema = f"fresh{round_}"
        conn.execute(f"CREATE SCHEMA {schema}")
        query = "SELECT n FROM public.numbers"
        views = [view(f"v{i}", "ops", schema=schema, name=f"v{i}", query=query) for i in range(4)]
        start = threading.Barrier(len(views))

        def apply(v: MaterializedView, start: threading.Barrier = start) -> None:
            with engine.connect(dsn) as own:
                start.wait()
                try:
                    engine.apply(own, v)
                except BaseException as exc:  # collected: the assertion below names them all
                    failures.append(exc)

        threads = [threading.Thread(target=apply, args=(v,)) for v in views]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
