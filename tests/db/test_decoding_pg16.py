"""LogicalDecoding on PostgreSQL 16 (pgserver's binaries): a drain lets the slot's restart point follow it.

A slot's restart_lsn, where the next read of its WAL starts, moves only to a running-transactions record the
slot has passed. PostgreSQL writes one every 15 s or at a checkpoint, so without help each drain decodes
again everything since the last one (a rebuild's whole WAL included). From 16 on, the drain writes one
itself with pg_log_standby_snapshot() when its role may (decoding.LOG_SNAPSHOT_QUERY). The suite's own
server is Debian's 15; this module starts a 16 of its own, with the same hostile look-alikes planted."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from matview.embedded.localpg import LocalServer, find_bindir
from matview.plan import decoding, engine
from matview.plan.executor import ExecutionSettings
from matview.plan.observed import Connection
from matview.refresh import drain, refresh
from tests import hostile
from tests.conftest import SERVER_SETTINGS, skip_or_fail
from tests.db.test_incremental import SCHEMA_SQL, apply, mismatches
from tests.db.test_logical_decoding import NOT_KEYED_BY_DRIVER, decoding_view

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def pg16() -> Iterator[LocalServer]:
    base = Path(tempfile.mkdtemp(prefix="matview-test-pg16-"))
    server = LocalServer(base / "data", bindir=find_bindir(prefer="embedded"), settings=dict(SERVER_SETTINGS))
    server.start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            version = admin.info.server_version
        if version < decoding.LOG_SNAPSHOT_MIN_VERSION:
            skip_or_fail(f"the embedded binaries in {server.bindir} are PostgreSQL {version}, not 16 or later")
        hostile.plant_in_template(server.dsn(), server.dsn("template1"))
        yield server
    finally:
        server.remove()


@pytest.fixture
def matrix16(pg16: LocalServer) -> Iterator[Connection]:
    shadow_log = hostile.ShadowLog(pg16.data_dir / "server.log")
    with psycopg.connect(pg16.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS matrix WITH (FORCE)")
        admin.execute("CREATE DATABASE matrix")
    with engine.connect(pg16.dsn("matrix")) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute("SELECT ops.load_driver_matrix(300)")
        for table in NOT_KEYED_BY_DRIVER:
            conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
        yield conn
        slots = conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots").fetchall()
        assert slots is not None
    called = shadow_log.take()
    assert not called, "an engine session called a hostile look-alike:\n" + "\n".join(called[:20])


def restart_lsn(conn: Connection, slot: str) -> str:
    row = conn.execute("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    assert row is not None, slot
    return str(row[0])


def test_the_slot_restarts_after_what_a_drain_read_not_where_the_last_checkpoint_left_it(
    matrix16: Connection,
) -> None:
    mv = decoding_view()
    apply(matrix16, mv)
    slot = decoding.slot_name(mv)
    matrix16.execute("CREATE TABLE public.elsewhere (v int, filler text)")
    matrix16.execute("INSERT INTO public.elsewhere SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
    matrix16.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-02-01')")
    row = matrix16.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    after_the_writes = str(row[0])
    # The first advance takes the first running-transactions record past where the slot stood, which may be
    # one the server wrote by itself in the middle of the writes; the second is then past them all.
    first = refresh(matrix16, mv)
    second = refresh(matrix16, mv)
    assert (first.mode, first.keys_applied) == ("Incremental", 1), first
    assert second.reason == "no changes pending", second
    assert mismatches(matrix16, mv) == (0, 0)
    behind = matrix16.execute(
        "SELECT %s::pg_lsn - %s::pg_lsn", (after_the_writes, restart_lsn(matrix16, slot))
    ).fetchone()
    assert behind is not None and behind[0] <= 0, f"restart_lsn is {behind} bytes before the writes already read"


SNAPSHOT_FUNCTION = sql.SQL("FUNCTION pg_catalog.pg_log_standby_snapshot()")
EXECUTE_SNAPSHOT = sql.SQL("EXECUTE ON {}").format(SNAPSHOT_FUNCTION)


@contextlib.contextmanager
def drainer_role(conn: Connection, attributes: sql.SQL, *grants: sql.Composable) -> Iterator[sql.Identifier]:
    """The role "drainer" (LOGIN and attributes) with these grants, dropped with what it owns afterwards."""
    role = sql.Identifier("drainer")
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN {}").format(role, attributes))
    try:
        for grant in grants:
            conn.execute(sql.SQL("GRANT {} TO {}").format(grant, role))
        yield role
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
        conn.execute(sql.SQL("DROP ROLE {}").format(role))


def test_a_role_not_allowed_to_log_a_snapshot_drains_as_before(matrix16: Connection, pg16: LocalServer) -> None:
    """The default (superusers only): the drain asks first and does not call it; granted, it may."""
    with (
        drainer_role(matrix16, sql.SQL("")) as role,
        psycopg.connect(pg16.dsn("matrix", user="drainer"), autocommit=True) as drainer,
    ):
        assert drainer.execute(decoding.MAY_LOG_SNAPSHOT_QUERY).fetchone() == (False,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            drainer.execute(decoding.LOG_SNAPSHOT_QUERY)
        matrix16.execute(sql.SQL("GRANT {} TO {}").format(EXECUTE_SNAPSHOT, role))
        assert drainer.execute(decoding.MAY_LOG_SNAPSHOT_QUERY).fetchone() == (True,)
        logged = drainer.execute(decoding.LOG_SNAPSHOT_QUERY).fetchone()
        assert logged is not None and logged[0] is not None, logged


def test_a_drain_goes_on_without_the_snapshot_when_its_role_loses_execute_on_it(
    matrix16: Connection, pg16: LocalServer
) -> None:
    """The drain asks once per connection whether it may log a snapshot; revoked since, the call fails and the
    drain sends the rest without it, losing no key."""
    mv = decoding_view()
    apply(matrix16, mv)
    usage, insert = sql.SQL("USAGE ON SCHEMA ops"), sql.SQL("INSERT ON ops.mx_mv_changes")
    with drainer_role(matrix16, sql.SQL("REPLICATION"), usage, insert, EXECUTE_SNAPSHOT) as role:
        with engine.connect(pg16.dsn("matrix", user="drainer")) as drainer:
            matrix16.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (9, '2026-02-01')")
            drain.drain(drainer, mv, ExecutionSettings())
            matrix16.execute(sql.SQL("REVOKE EXECUTE ON {} FROM {}").format(SNAPSHOT_FUNCTION, role))
            matrix16.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (10, '2026-02-01')")
            drain.drain(drainer, mv, ExecutionSettings())
        keys = "SELECT DISTINCT k FROM ops.mx_mv_changes, unnest(driver_id) AS k ORDER BY 1"
        logged = matrix16.execute(keys).fetchall()
        assert logged == [(9,), (10,)], logged
        result = refresh(matrix16, mv)
        assert (result.mode, result.keys_applied) == ("Incremental", 2), result
        assert mismatches(matrix16, mv) == (0, 0)


def test_a_drain_denied_something_else_keeps_logging_the_snapshot(matrix16: Connection, pg16: LocalServer) -> None:
    """Only a denied pg_log_standby_snapshot() makes a connection drain without it: a role that may still run
    it, denied the change log instead, gets that error and keeps the snapshot for its next drain."""
    mv = decoding_view()
    apply(matrix16, mv)
    with drainer_role(matrix16, sql.SQL("REPLICATION"), sql.SQL("USAGE ON SCHEMA ops"), EXECUTE_SNAPSHOT) as role:
        with engine.connect(pg16.dsn("matrix", user="drainer")) as drainer:
            matrix16.execute("INSERT INTO ops.trips (driver_id, trip_date) VALUES (11, '2026-02-01')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="mx_mv_changes"):
                drain.drain(drainer, mv, ExecutionSettings())
            assert drain._MAY_LOG_SNAPSHOT[drainer] is True
            matrix16.execute(sql.SQL("GRANT INSERT ON ops.mx_mv_changes TO {}").format(role))
            drain.drain(drainer, mv, ExecutionSettings())
        logged = matrix16.execute("SELECT DISTINCT k FROM ops.mx_mv_changes, unnest(driver_id) AS k").fetchall()
        assert logged == [(11,)], logged
