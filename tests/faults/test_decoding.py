"""incremental.capture: LogicalDecoding across server stops: the slot lives in the server, so a clean stop
and a crash (immediate stop, recovery on start) keep every change committed before it. Counted per fault:
keys lost (rows of the view that differ from a full recompute once refreshed), and failures reported.

A refresh cut off between the log and the slot's advance is tests/db/test_logical_decoding.py's (it kills
the drain's own backend at that exact point)."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from matview.plan import engine
from matview.refresh import apply_and_record, refresh
from tests.faults.harness import EXPECTED
from tests.faults.test_standalone import World
from tests.helpers import view

pytestmark = pytest.mark.timeout(240)

QUERY = "SELECT kind, count(*) AS n, sum(amount) AS total FROM app.events GROUP BY kind"


def events_totals(source: dict[str, Any], refresh: dict[str, str] | None = None, **incremental: Any) -> Any:
    """app.totals over app.events by kind, incremental with source's declaration added to app.events'."""
    return view(
        "totals",
        "app",
        schema="app",
        name="totals",
        storage="Table",
        query=QUERY,
        incremental={
            "keyColumns": ["kind"],
            "sources": [{"table": "app.events", "columns": ["kind"], **source}],
            **incremental,
        },
        refresh={"interval": "1m", **(refresh or {})},
    )


def decoding_view() -> Any:
    return events_totals({}, capture="LogicalDecoding")


def differences(conn: engine.Connection) -> int:
    query = f"""
    WITH stored AS MATERIALIZED (SELECT kind, n, total FROM app.totals),
         computed AS MATERIALIZED ({EXPECTED.replace(" ORDER BY kind", "")})
    SELECT (SELECT count(*) FROM (SELECT * FROM stored EXCEPT ALL SELECT * FROM computed) a)
         + (SELECT count(*) FROM (SELECT * FROM computed EXCEPT ALL SELECT * FROM stored) b)"""
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("stop", ["fast", "immediate"])
def test_changes_committed_before_a_server_stop_or_crash_are_applied_after_it(world: World, stop: str) -> None:
    scenario = world(f"decoding-{stop}", settings={"wal_level": "logical"})
    dsn = scenario.server.dsn()
    with scenario.admin() as admin:
        admin.execute("ALTER TABLE app.events REPLICA IDENTITY FULL")
    mv = decoding_view()
    with engine.connect(dsn) as conn:
        apply_and_record(conn, mv)
    reported = 0
    for round_number in range(3):
        with scenario.admin() as admin:  # committed (synchronous_commit on) before the stop
            admin.execute(
                "INSERT INTO app.events SELECT 10000 * %s + g, 'k' || (g %% 7), g FROM generate_series(1, 40) g",
                (round_number + 1,),
            )
            admin.execute("UPDATE app.events SET kind = 'moved' WHERE id %% 101 = %s", (round_number,))
        scenario.stop_server(stop)
        scenario.start_server()
        with engine.connect(dsn) as conn:
            result = refresh(conn, mv, "Incremental")  # never a rebuild, which would hide a lost key
            reported += result.result == "failure"
            assert result.result == "success" and result.mode == "Incremental", result
            assert result.keys_applied, result
            assert differences(conn) == 0, f"keys lost after a {stop} stop (round {round_number})"
    assert reported == 0  # a stop between refreshes is no refresh's failure


def test_a_change_flushed_but_not_yet_visible_is_applied_once_it_is(world: World) -> None:
    """A commit waiting for a synchronous standby is in the flushed WAL (a drain decodes it) but not yet
    visible (a refresh's snapshot does not see it). The slot must not pass it until it is: otherwise its key is
    recomputed without it, consumed, and never read again."""
    scenario = world("decoding-invisible", settings={"wal_level": "logical"})
    with scenario.admin() as admin:
        admin.execute("ALTER TABLE app.events REPLICA IDENTITY FULL")
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")  # a standby that never answers
        admin.execute("SELECT pg_reload_conf()")
    # Our own sessions commit without the standby; the writer's does not.
    local = psycopg.conninfo.make_conninfo(scenario.server.dsn(), options="-c synchronous_commit=local")
    scenario.wait(lambda: _setting(scenario.server.dsn(), "synchronous_standby_names") == "ghost", "the reload")
    mv = decoding_view()
    with engine.connect(local) as conn:
        apply_and_record(conn, mv)
        writer = psycopg.connect(scenario.server.dsn(), autocommit=True)
        pid = writer.info.backend_pid
        waiting = threading.Thread(
            target=lambda: writer.execute("INSERT INTO app.events VALUES (900001, 'held', 5)"), daemon=True
        )
        waiting.start()
        scenario.wait(lambda: _wait_event(conn, pid) == "SyncRep", "the writer to wait for the standby")

        first = refresh(conn, mv, "Incremental")  # decodes the commit; the row is not visible yet
        assert first.result == "success", first
        assert conn.execute("SELECT count(*) FROM app.totals WHERE kind = 'held'").fetchone() == (0,)

        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))  # ends the wait: the commit becomes visible
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        writer.close()
        second = refresh(conn, mv, "Incremental")
        assert second.result == "success" and second.mode == "Incremental", second
        assert conn.execute("SELECT n, total FROM app.totals WHERE kind = 'held'").fetchone() == (1, 5)
        assert differences(conn) == 0


def _setting(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        return str(row[0]) if row else ""


def _wait_event(conn: engine.Connection, pid: int) -> str | None:
    row = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return str(row[0]) if row and row[0] is not None else None
