"""A refresh that ran the user's SQL only inside REFRESH MATERIALIZED VIEW cleans its session in its own last
transaction, and the pool's reset then sends nothing (issue #22); what makes that safe is PostgreSQL's, and is
checked here on the server the suite runs, so a server that relaxed it would fail this file first."""

from __future__ import annotations

import psycopg
import pytest

from matview.plan import engine, session
from matview.plan.observed import Connection
from matview.refresh import refresh
from tests.helpers import view

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
