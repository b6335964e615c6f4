"""A refresh that ran the user's SQL only inside REFRESH MATERIALIZED VIEW cleans its session in its own last
transaction, and the pool's reset then sends nothing (issue #22); what makes that safe is PostgreSQL's, and is
checked here on the server the suite runs, so a server that relaxed it would fail this file first."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from matview.api.spec import MaterializedView
from matview.plan import engine, session
from matview.plan.observed import Connection
from matview.refresh import refresh
from tests.helpers import RoundTrips, view

#: What a query may try from inside REFRESH, each of which would outlive it in a pooled session.
SESSION_CHANGES = {
    "prepare": "EXECUTE 'PREPARE squatted AS SELECT 1'",
    "deallocate": "EXECUTE 'DEALLOCATE ALL'",
    "listen": "EXECUTE 'LISTEN channel'",
    "unlisten": "EXECUTE 'UNLISTEN *'",
    "temporary table": "EXECUTE 'CREATE TEMP TABLE kept (a int)'",
    "role": "EXECUTE 'SET ROLE NONE'",
    "session authorization": "EXECUTE 'SET SESSION AUTHORIZATION DEFAULT'",
    "held cursor": "EXECUTE 'DECLARE kept CURSOR WITH HOLD FOR SELECT 1'",
    "discard": "EXECUTE 'DISCARD ALL'",
}


def view_of_ten_rows(conn: Connection, name: str, columns: str = "id", **spec: object) -> MaterializedView:
    """A view with a unique index over a 10-row ops.src (made here): the shape these tests refresh."""
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.src AS SELECT g AS id FROM generate_series(1, 10) g")
    return view(
        name,
        "ops",
        schema="ops",
        query=f"SELECT {columns} FROM ops.src",
        indexes=[{"columns": ["id"], "unique": True}],
        **spec,
    )


@pytest.mark.parametrize("change", sorted(SESSION_CHANGES))
def test_refresh_refuses_what_would_outlive_it_in_the_session(conn: Connection, change: str) -> None:
    """The premise of session.IN_BAND_CLEANUP: inside REFRESH each of these is refused."""
    conn.execute(f"""
        CREATE SCHEMA ops;
        CREATE FUNCTION ops.change() RETURNS int LANGUAGE plpgsql AS $$
        BEGIN {SESSION_CHANGES[change]}; RETURN 1; END $$;
        CREATE MATERIALIZED VIEW ops.changer AS SELECT ops.change() AS one WITH NO DATA;
    """)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="security-restricted operation"):
        conn.execute("REFRESH MATERIALIZED VIEW ops.changer")


@pytest.mark.parametrize("mode", ["Concurrent", "Full"])
def test_a_refresh_leaves_a_clean_session_and_the_reset_sends_nothing(conn: Connection, dsn: str, mode: str) -> None:
    """What REFRESH lets a query keep (a session advisory lock, sequence state; settings it undoes itself) is gone
    when the refresh returns, and the reset that follows sends no statement."""
    conn.execute("CREATE SCHEMA ops; CREATE SEQUENCE ops.counter")
    keeper = view(
        "keeper",
        "ops",
        schema="ops",
        query="SELECT nextval('ops.counter') AS n, pg_try_advisory_lock(4242::bigint) AS grabbed, "
        "set_config('work_mem', '64kB', false) AS w",
        indexes=[{"columns": ["n"], "unique": True}],
        refresh={"mode": mode},
    )
    with engine.connect(dsn) as lane:
        engine.apply(lane, keeper)
        session.reset(lane)  # the apply ran the query as itself: a full reset
        for _ in range(2):
            result = refresh(lane, keeper)
            assert (result.result, result.mode) == ("success", mode), result
        assert conn.execute("SELECT n, grabbed FROM ops.keeper").fetchone() == (3, True), "the query ran each time"
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
        assert conn.execute(held).fetchone() == (0,), "the advisory lock outlived the refresh"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            lane.execute("SELECT currval('ops.counter')")  # sequence state was discarded too

        last = "SELECT query FROM pg_stat_activity WHERE pid = %s"
        before = conn.execute(last, (lane.info.backend_pid,)).fetchone()
        session.reset(lane)
        assert conn.execute(last, (lane.info.backend_pid,)).fetchone() == before, "the reset sent a statement"
        assert lane.execute("SELECT current_setting('work_mem'), current_setting('search_path')").fetchone() == (
            conn.execute("SELECT current_setting('work_mem')").fetchone()[0],  # type: ignore[index]
            session.ENGINE_SEARCH_PATH,
        )


def test_a_step_that_runs_the_query_as_itself_makes_the_next_reset_a_full_one(conn: Connection, dsn: str) -> None:
    """After the query ran unrestricted on a connection (an apply's build), a later clean refresh does not spare
    the reset: what the build left is only cleared by it."""
    conn.execute("CREATE SCHEMA ops")
    plain = view("plain", "ops", schema="ops", query="SELECT 1 AS one", refresh={"mode": "Full"})
    with engine.connect(dsn) as lane:
        engine.apply(lane, plain)
        lane.execute("SELECT pg_advisory_lock(4343::bigint)")  # as a build's query could have left it
        assert refresh(lane, plain).result == "success"  # its cleanup released it, but the reset must still run
        lane.execute("SET work_mem = '64kB'")  # stands for what a build left that only the reset clears
        session.reset(lane)
        assert lane.execute("SELECT current_setting('work_mem')").fetchone() != ("64kB",)


def test_a_batched_transaction_commits_in_one_round_trip(conn: Connection, tmp_path: Path) -> None:
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.kept (n int)")
    with RoundTrips(conn, tmp_path / "trace") as trips, session.one_batch(conn), session.transaction_in_batch(conn):
        conn.execute("INSERT INTO ops.kept VALUES (1)")
        conn.execute("INSERT INTO ops.kept VALUES (2)")
    assert trips.count() == 1
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) FROM ops.kept").fetchone() == (2,)


def test_a_batched_transaction_that_fails_keeps_nothing_and_leaves_no_transaction(conn: Connection) -> None:
    """A statement's error skips the rest (COMMIT included) and is rolled back; so is an exception the block
    raises after sending statements; and statements after the transaction in the batch do not run."""
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.kept (n int PRIMARY KEY)")
    with pytest.raises(psycopg.errors.UniqueViolation), session.one_batch(conn):
        with session.transaction_in_batch(conn):
            conn.execute("INSERT INTO ops.kept VALUES (1)")
            conn.execute("INSERT INTO ops.kept VALUES (1)")
            conn.execute("INSERT INTO ops.kept VALUES (2)")
        conn.execute("INSERT INTO ops.kept VALUES (3)")
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    with pytest.raises(ZeroDivisionError), session.one_batch(conn), session.transaction_in_batch(conn):
        conn.execute("INSERT INTO ops.kept VALUES (4)")
        conn.execute("SELECT 1").fetchone()  # synced: the INSERT ran, inside the open transaction
        _ = 1 / 0
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) FROM ops.kept").fetchone() == (0,)


def test_a_batched_transaction_refuses_to_start_inside_another(conn: Connection) -> None:
    """Its BEGIN would only warn there, and its COMMIT would end the caller's transaction."""
    refused = pytest.raises(psycopg.ProgrammingError, match="already open")
    with conn.transaction(), refused, session.one_batch(conn), session.transaction_in_batch(conn):
        pass


#: Values a hostile spec or database user may put where the engine binds a value: quotes, backslashes (read as
#: escapes when standard_conforming_strings is off), dollar quotes, comments and statement ends.
HOSTILE_VALUES = [
    "it's",
    "'); DROP TABLE ops.kept; --",
    "back\\slash\\' OR true --",
    "$$; DROP TABLE ops.kept; $$",
    "/* open comment",
    "line\n-- comment\n; COMMIT",
    "ünïcødé ☃",
]


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_a_message_binds_hostile_values_exactly(conn: Connection, tmp_path: Path, conforming: str) -> None:
    """A message binds values client-side (the simple protocol has no parameters): each value arrives exactly as
    given, whatever the session's string syntax, and no value ends its statement or reaches the next."""
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.kept (n int)")
    conn.execute(f"SET standard_conforming_strings = {conforming}")
    message = session.Message(conn)
    for n, value in enumerate(HOSTILE_VALUES):
        message.add(psycopg.sql.SQL("SELECT %s::text, %s::int"), (value, n))
    message.add(psycopg.sql.SQL("SELECT count(*) FROM ops.kept"))
    with RoundTrips(conn, tmp_path / "trace") as trips:
        cursor = message.send()
    assert trips.count() == 1
    rows = [cursor.fetchone()]
    while cursor.nextset():
        rows.append(cursor.fetchone())
    assert rows == [*((value, n) for n, value in enumerate(HOSTILE_VALUES)), (0,)]
    at = message.add(psycopg.sql.SQL("SELECT 'first'"))
    last = message.add(psycopg.sql.SQL("SELECT 'last'"))
    assert (at, last) == (0, 1)  # positions count from each send
    assert session.result_of(message.send(), last).fetchone() == ("last",)
    assert conn.execute("SELECT to_regclass('ops.kept') IS NOT NULL").fetchone() == (True,)


def transaction_status(conn: Connection) -> pq.TransactionStatus:
    """Read afresh each time (an attribute compared in an assert stays narrowed for the type checker)."""
    return conn.info.transaction_status


def test_a_message_stops_at_its_first_error_and_its_transaction_rolls_back(conn: Connection) -> None:
    """What the executor relies on: the statements after the failing one do not run (COMMIT included), the
    transaction is left failed, and roll_back ends it with nothing kept."""
    conn.execute("CREATE SCHEMA ops; CREATE TABLE ops.kept (n int PRIMARY KEY)")
    message = session.Message(conn)
    session.start_transaction(conn, message)
    for n in (1, 1, 2):
        message.add(psycopg.sql.SQL("INSERT INTO ops.kept VALUES (%s)"), (n,))
    message.add(session.COMMIT)
    with pytest.raises(psycopg.errors.UniqueViolation):
        message.send()
    assert transaction_status(conn) == pq.TransactionStatus.INERROR
    session.roll_back(conn)
    assert transaction_status(conn) == pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) FROM ops.kept").fetchone() == (0,)
    with conn.transaction(), pytest.raises(psycopg.ProgrammingError, match="already open"):
        session.start_transaction(conn, session.Message(conn))


@pytest.mark.parametrize(("mode", "trips"), [("Concurrent", 3), ("Full", 3), ("Swap", 4)])
def test_a_refresh_makes_few_round_trips(conn: Connection, dsn: str, tmp_path: Path, mode: str, trips: int) -> None:
    """A warm refresh and the cleaning before its connection goes back: the lock with the inspection's read, the
    refresh transaction (its duration read, then the closing with its COMMIT). A Swap: the lock, the build, the swap,
    and the retired copy's drop with the closing and the session's reset (its duration ends at the swap). psycopg's
    own transaction() in a pipeline synced on each side of every block: 6 round trips for a Concurrent refresh, 16
    for a Swap; the reset before the connection went back made a Swap's 6th."""
    counted = view_of_ten_rows(conn, "counted")
    with engine.connect(dsn) as lane:
        engine.apply(lane, counted)
        session.reset(lane)
        for _ in range(2):  # warm: Auto's evidence and the marker's state as a lane has them
            assert refresh(lane, counted, mode).result == "success"
        with RoundTrips(lane, tmp_path / "trace") as counter:
            assert refresh(lane, counted, mode).result == "success"
            session.clean_for_return(lane)
    assert counter.count() == trips


def test_a_swap_keeps_the_statements_psycopg_prepared(conn: Connection, dsn: str) -> None:
    """A Swap renames and drops relations; psycopg would forget (and deallocate) every statement it prepared on the
    connection when it saw those results, and the lock's inspection read would be planned again on every refresh.
    Its messages go with psycopg's preparing off: the inspection read stays prepared, and is used."""
    swapped = view_of_ten_rows(conn, "swapped", refresh={"mode": "Swap"})
    inspection = (
        "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
        "WHERE NOT from_sql AND statement LIKE '%WITH RECURSIVE target AS%'"
    )
    with engine.connect(dsn) as lane:
        engine.apply(lane, swapped)
        for _ in range(6):  # psycopg prepares a statement on its fifth use
            assert refresh(lane, swapped).result == "success"
            session.clean_for_return(lane)
        prepared = lane.execute(inspection).fetchall()
        assert len(prepared) == 1, prepared
        for _ in range(2):
            assert refresh(lane, swapped).result == "success"
            session.clean_for_return(lane)
        ((name, runs),) = lane.execute(inspection).fetchall()
        assert (name, runs) == (prepared[0][0], prepared[0][1] + 2)


def test_a_swap_resets_the_session_in_its_last_transaction(conn: Connection, dsn: str) -> None:
    """A Swap's build runs the query unrestricted as far as the engine knows, so its session needs the whole reset:
    it comes in band, in the transaction that drops the retired copy. What the session held before (a setting, a
    LISTEN, a temporary table, an advisory lock the query took) is gone when the refresh returns, the search_path
    is the engine's, and the reset before the connection goes back sends nothing."""
    swapped = view_of_ten_rows(
        conn, "swapped", "id, pg_try_advisory_lock(4545::bigint) AS grabbed", refresh={"mode": "Swap"}
    )
    with engine.connect(dsn) as lane:
        engine.apply(lane, swapped)
        session.reset(lane)
        lane.execute("SET work_mem = '64kB'")
        lane.execute("LISTEN left_behind")
        lane.execute("CREATE TEMP TABLE left_behind (a int)")
        session.exposed(lane)  # stands for a build that left them
        lane.execute("SELECT 1", prepare=True)  # one of psycopg's own, which the Swap's DROP must not lose
        result = refresh(lane, swapped)
        assert (result.result, result.mode) == ("success", "Swap"), result
        assert conn.execute("SELECT bool_and(grabbed) FROM ops.swapped").fetchone() == (True,)
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4545"
        assert conn.execute(held).fetchone() == (0,), "the advisory lock outlived the refresh"
        assert lane.execute(
            "SELECT current_setting('work_mem'), current_setting('search_path'), "
            "(SELECT count(*) FROM pg_listening_channels()), to_regclass('pg_temp.left_behind')"
        ).fetchone() == (
            conn.execute("SELECT current_setting('work_mem')").fetchone()[0],  # type: ignore[index]
            session.ENGINE_SEARCH_PATH,
            0,
            None,
        )
        last = "SELECT query FROM pg_stat_activity WHERE pid = %s"
        before = conn.execute(last, (lane.info.backend_pid,)).fetchone()
        session.clean_for_return(lane)
        assert conn.execute(last, (lane.info.backend_pid,)).fetchone() == before, "the reset sent a statement"


@pytest.mark.parametrize("squat", [False, True])
def test_an_in_band_reset_leaves_a_statement_prepared_from_sql_to_the_whole_reset(
    conn: Connection, dsn: str, squat: bool
) -> None:
    """A transaction cannot deallocate a statement prepared from SQL (an incremental apply's query could have, through
    EXECUTE in a function): the in-band reset sees it, the session stays exposed, and the reset before the connection
    goes back runs in full, DISCARD ALL included. Without one, that reset sends nothing."""
    squatted = "SELECT count(*) FROM pg_prepared_statements WHERE from_sql"
    with engine.connect(dsn) as lane:
        lane.execute("SELECT 1", prepare=True)  # one of psycopg's own, which must survive a clean reset
        session.exposed(lane)
        message = session.Message(lane)
        session.start_transaction(lane, message)
        if squat:
            message.add(psycopg.sql.SQL("PREPARE squatted AS SELECT 1"))
        reset = session.reset_in_band(lane, message)
        message.add(session.COMMIT)
        session.reset_in_band_committed(lane, reset, session.result_of(message.send(), reset.position).fetchone())
        assert lane.execute(squatted).fetchone() == (int(squat),)
        last = "SELECT query FROM pg_stat_activity WHERE pid = %s"
        before = conn.execute(last, (lane.info.backend_pid,)).fetchone()
        session.clean_for_return(lane)
        sent = conn.execute(last, (lane.info.backend_pid,)).fetchone() != before
        assert sent == squat
        assert lane.execute(squatted).fetchone() == (0,)
        assert lane.execute("SELECT current_setting('search_path')").fetchone() == (session.ENGINE_SEARCH_PATH,)


def test_a_connection_is_cleaned_in_its_own_thread_before_it_goes_back(conn: Connection, dsn: str) -> None:
    """session.clean_for_return, as a lane's thread calls it: a transaction left failed is rolled back and the
    session reset (a setting the work left is gone); a connection whose server session ended is closed, so the
    pool discards it instead of handing it out."""
    with engine.connect(dsn) as lane:
        session.exposed(lane)  # the work ran the user's SQL as itself: a full reset
        lane.execute("SET work_mem = '64kB'")
        lane.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            lane.execute("SELECT 1 / 0")
        assert transaction_status(lane) == pq.TransactionStatus.INERROR
        session.clean_for_return(lane)
        assert transaction_status(lane) == pq.TransactionStatus.IDLE
        assert lane.execute("SELECT current_setting('work_mem')").fetchone() != ("64kB",)
        conn.execute("SELECT pg_terminate_backend(%s)", (lane.info.backend_pid,))
        session.clean_for_return(lane)
        assert lane.closed
