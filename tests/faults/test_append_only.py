"""Append-only sources (issue #23) across faults: the refresh's backend killed while its drain waits for a writer
in flight, and the server crashing between refreshes. Counted per fault: rows lost (rows of the view that differ
from a full recompute once refreshed) and failures reported against failures injected.

The watermark lives in the view's marker, written with each refresh's success, so a fault before that commit
leaves the old one and the next refresh reads the same rows again."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from matview.constants import APPLICATION_NAME
from matview.plan import engine
from matview.refresh import apply_and_record, refresh
from tests.faults.harness import Scenario
from tests.faults.test_decoding import differences, events_totals

pytestmark = pytest.mark.timeout(240)


def appended_view() -> Any:
    # A long lockTimeout: the drain must still be waiting for the writer when the test kills it.
    return events_totals({"appendOnly": {"column": "id"}}, refresh={"lockTimeout": "30s"})


def add_events(conn: psycopg.Connection[Any], first: int, kind: str, count: int = 20) -> None:
    conn.execute(
        "INSERT INTO app.events SELECT g, %s, g %% 13 FROM generate_series(%s::int, %s::int) g",
        (kind, first, first + count - 1),
    )


def waiting_drain(admin: psycopg.Connection[Any]) -> int | None:
    """The backend of the engine's session while its drain polls for writers in flight."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s",
        (APPLICATION_NAME, "%virtualtransaction OPERATOR%ANY%"),
    ).fetchone()
    return int(row[0]) if row else None


def applied(scenario: Scenario) -> tuple[str, Any]:
    """The view applied in scenario's database and refreshed once (the first refresh records the watermark)."""
    dsn = scenario.server.dsn()
    mv = appended_view()
    with engine.connect(dsn) as conn:
        apply_and_record(conn, mv)
        assert refresh(conn, mv).result == "success"
    return dsn, mv


def test_a_refresh_killed_while_it_waits_for_a_writer_loses_no_row(world: Any) -> None:
    scenario: Scenario = world("append-only-killed")
    dsn, mv = applied(scenario)
    injected = reported = 0
    for round_number in range(3):
        base = 100_000 * (round_number + 1)
        with scenario.admin() as admin, psycopg.connect(dsn) as writer:
            add_events(writer, base, f"slow{round_number}")  # in flight: its ids are below the next ones
            add_events(admin, base + 1000, f"fast{round_number}")
            results: list[Any] = []

            def run(results: list[Any] = results) -> None:
                with engine.connect(dsn) as conn:
                    results.append(refresh(conn, mv))

            refresher = threading.Thread(target=run)
            refresher.start()
            deadline = time.monotonic() + 30
            pid = None
            while pid is None and time.monotonic() < deadline:
                pid = waiting_drain(admin)
                time.sleep(0.005)
            assert pid is not None, "the drain never waited for the writer in flight"
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            injected += 1
            refresher.join()
            writer.commit()
        (result,) = results
        reported += result.result == "failure"
        with engine.connect(dsn) as conn:
            again = refresh(conn, mv, "Incremental")  # never a rebuild, which would hide a lost row
            assert again.result == "success", again
            assert differences(conn) == 0, f"rows lost after the drain was killed (round {round_number})"
    assert (injected, reported) == (3, 3)


def test_rows_appended_before_a_crash_are_read_after_it(world: Any) -> None:
    scenario: Scenario = world("append-only-crash")
    dsn, mv = applied(scenario)
    for round_number in range(3):
        with scenario.admin() as admin:  # committed (synchronous_commit on) before the crash
            add_events(admin, 500_000 + 1000 * round_number, f"crash{round_number}")
        scenario.stop_server("immediate")
        scenario.start_server()
        with engine.connect(dsn) as conn:
            result = refresh(conn, mv, "Incremental")
            assert result.result == "success" and result.keys_applied == 1, result
            assert differences(conn) == 0, f"rows lost across a crash (round {round_number})"
