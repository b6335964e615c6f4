"""incremental.capture: LogicalDecoding across server stops: the slot lives in the server, so a clean stop
and a crash (immediate stop, recovery on start) keep every change committed before it. Counted per fault:
keys lost (rows of the view that differ from a full recompute once refreshed), and failures reported.

A refresh cut off between the log and the slot's advance is tests/db/test_logical_decoding.py's (it kills
the drain's own backend at that exact point)."""

from __future__ import annotations

from typing import Any

import pytest

from matview.plan import engine
from matview.refresh import apply_and_record, refresh
from tests.faults.harness import EXPECTED
from tests.faults.test_standalone import World
from tests.helpers import view

pytestmark = pytest.mark.timeout(240)

QUERY = "SELECT kind, count(*) AS n, sum(amount) AS total FROM app.events GROUP BY kind"


def decoding_view() -> Any:
    return view(
        "totals",
        "app",
        schema="app",
        name="totals",
        storage="Table",
        query=QUERY,
        incremental={
            "keyColumns": ["kind"],
            "sources": [{"table": "app.events", "columns": ["kind"]}],
            "capture": "LogicalDecoding",
        },
        refresh={"interval": "1m"},
    )


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
