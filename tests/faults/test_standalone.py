"""Faults a user can meet, injected into a real `matview run` against a real PostgreSQL (issue #11).

Every scenario asserts the same four things and adds its row to the report printed at the end:
no row lost (the view equals a full recompute once recovered), zero reader errors while the server
was up, failures counted by /metrics at least as many as injected and never an unbounded stream, and
recovery within one interval (3 s) plus 60 s after the fault ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.faults.harness import EXPECTED, QUERY, Scenario, spec

INTERVAL_SECONDS = 3
RECOVERY_BOUND = INTERVAL_SECONDS + 60
#: Failed attempts one injected fault may cause: retries back off from 1 s, doubling up to the interval.
MAX_FAILURES_PER_FAULT = 25

World = Callable[..., Scenario]
pytestmark = pytest.mark.timeout(240)


def verdict(w: Scenario, row: dict[str, Any], injected_failures: bool = True) -> None:
    assert row["rows_lost"] == 0, (row, w.logs())
    assert row["reader_errors"] == 0, (w.reader.errors[:5] if w.reader else None, w.logs())
    if w.reader is not None:
        assert row["reads"] > 0
    if injected_failures:
        assert w.injected <= row["failures_counted"] <= w.injected * MAX_FAILURES_PER_FAULT, (row, w.logs())
    else:
        assert row["failures_counted"] == 0, (row, w.logs())
    assert row["recovery_seconds"] is not None and row["recovery_seconds"] <= RECOVERY_BOUND


def running(w: Scenario, *extra: str) -> Scenario:
    """The runner started and the view built and fresh, with the reader going."""
    w.start_runner(*extra)
    w.wait(w.fresh, "the first build", 60)
    w.start_reader()
    return w


def failures_reach(w: Scenario, count: int) -> Callable[[], bool]:
    return lambda: w.scrape_all()["failures"] >= count


@pytest.mark.parametrize("mode", ["Concurrent", "Swap", "Full"])
def test_postgresql_stopped_immediately_mid_refresh(world: World, mode: str) -> None:
    w = running(world(f"crash mid-refresh ({mode})", mode=mode))
    w.set_slow(3)
    w.add_rows()
    w.wait(w.refreshing, "a refresh in flight", 30)
    w.stop_server("immediate")
    w.injected = 1
    w.wait(failures_reach(w, 1), "the runner to count the refresh the crash killed", 30)
    w.start_server()
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())


def test_database_down_when_the_runner_starts(world: World) -> None:
    w = world("database down at start")
    w.stop_server("fast")
    w.start_runner()
    w.injected = 1
    # Longer than the pool's 10 s wait for a connection: the first apply fails and must be retried.
    w.wait(failures_reach(w, 1), "the failed apply to be counted", 30)
    w.start_server()
    w.wait(w.fresh, "the view to be built once the database is back", RECOVERY_BOUND)
    w.start_reader()
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())


def orphan_gone(w: Scenario) -> Callable[[], bool]:
    return lambda: not w.refreshing()


def killed_and_restarted(w: Scenario) -> float:
    """SIGKILL the runner, start another at once, and wait for the dead client's statement to stop in the
    server; how long that took."""
    w.kill_runner(w.runners[-1][0])
    killed = time.monotonic()
    w.start_runner()
    w.wait(orphan_gone(w), "the dead client's build to stop", 15)
    return time.monotonic() - killed


def test_runner_killed_mid_swap_and_restarted_at_once(world: World) -> None:
    w = running(world("runner SIGKILLed mid Swap", mode="Swap"))
    w.set_slow(20)  # far longer than the check interval: only the dead-client check can end it early
    w.add_rows()
    w.wait(w.refreshing, "a Swap build in flight", 30)
    orphan_seconds = killed_and_restarted(w)
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report(orphan_seconds=round(orphan_seconds, 1)), injected_failures=False)
    assert orphan_seconds < 10  # client_connection_check_interval (2 s), not refresh.timeout (60 s)


def test_runner_killed_mid_build_and_swap_and_restarted_at_once(world: World) -> None:
    w = running(world("runner SIGKILLed mid build-and-swap", mode="Swap"))
    w.set_slow(20)
    w.write_spec(spec("Swap", query=QUERY.replace("AS guard", "AS guard, max(amount) AS top")))
    w.wait(w.refreshing, "the build of the edited query", 30)
    killed_and_restarted(w)
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)

    def has_new_column() -> bool:
        with w.admin() as conn:
            found = conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'app.totals'::regclass AND attname = 'top'"
            )
            return found.fetchone() == (1,)

    w.wait(has_new_column, "the edited query to be live", RECOVERY_BOUND)
    with w.admin() as conn:
        leftovers = conn.execute("SELECT count(*) FROM pg_class WHERE relname ~ '_mv_(staging|retired)$'").fetchone()
    assert leftovers == (0,)
    verdict(w, w.report(), injected_failures=False)


def test_refresh_past_its_timeout(world: World) -> None:
    w = world("refresh past its timeout")
    w.write_spec(spec(timeout="2s"))
    running(w)
    w.set_slow(4)
    w.add_rows()
    w.injected = 1
    w.wait(failures_reach(w, 1), "a timed-out refresh to be counted", 30)
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())
    assert "timeout" in w.logs()


@pytest.mark.parametrize("mode", ["Swap", "Full"])
def test_a_reader_holding_access_share_for_20_seconds(world: World, mode: str) -> None:
    w = running(world(f"reader holds ACCESS SHARE 20 s ({mode})", mode=mode))
    w.add_rows()
    with w.admin() as holder:
        holder.autocommit = False
        holder.execute("SELECT count(*) FROM app.totals").fetchone()  # ACCESS SHARE until the transaction ends
        held_since = time.monotonic()
        w.injected = 1
        w.wait(failures_reach(w, 1), "the refresh to give up on its lock", 30)
        time.sleep(max(0.0, held_since + 20 - time.monotonic()))
        holder.rollback()
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())
    assert "lock_timeout" in w.logs() or "lock timeout" in w.logs()


def test_the_query_failing_on_new_data(world: World) -> None:
    w = running(world("query fails on new data"))
    with w.admin() as conn:
        conn.execute("INSERT INTO app.events VALUES (-1, 'k1', 0)")  # 100 / amount: division by zero
    w.injected = 1
    w.wait(failures_reach(w, 1), "the failing refresh to be counted", 30)
    with w.admin() as conn:
        conn.execute("DELETE FROM app.events WHERE id = -1")
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())
    assert "division by zero" in w.logs()


def test_two_runners_on_the_same_view(world: World) -> None:
    w = running(world("two runners", mode="Swap"))
    w.start_runner()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        w.add_rows(20)
        time.sleep(1)
    w.recover(RECOVERY_BOUND)
    totals = w.scrape_all()
    assert totals["successes"] >= 2
    verdict(w, w.report(skipped=int(totals["skipped"])), injected_failures=False)
    assert "42P07" not in w.logs() and "already exists" not in w.logs()


def test_the_password_rotated(world: World) -> None:
    w = running(world("password rotated (DSN file re-read)"))
    with w.admin() as conn:
        conn.execute("ALTER ROLE app PASSWORD 'second-password'")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
    w.add_rows()
    w.injected = 1
    w.wait(failures_reach(w, 1), "the refused login to be counted", 30)
    w.dsn_file.write_text(w.app_dsn("second-password"))  # what a rotated Secret mount does
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report())


def test_the_query_edited_mid_refresh(world: World) -> None:
    w = running(world("query edited mid-refresh"))
    w.set_slow(4)
    w.add_rows()
    w.wait(w.refreshing, "a refresh in flight", 30)
    edited = QUERY.replace("GROUP BY kind", "WHERE amount > 10 GROUP BY kind")
    w.write_spec(spec(query=edited))
    w.set_slow(0)
    w.expected_sql = EXPECTED.replace("GROUP BY kind", "WHERE amount > 10 GROUP BY kind")
    w.recovery_seconds = w.wait(w.fresh, "the edited query to be applied after the refresh", RECOVERY_BOUND)
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report(), injected_failures=False)


def test_connections_exhausted(world: World) -> None:
    w = running(world("max_connections reached", settings={"max_connections": "12"}))
    hogs: list[psycopg.Connection[Any]] = []
    try:
        with w.admin() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        while True:  # every slot a non-superuser may take
            try:
                hogs.append(psycopg.connect(w.app_dsn("first-password"), autocommit=True))
            except psycopg.OperationalError:
                break
        w.add_rows()
        w.injected = 1
        w.wait(failures_reach(w, 1), "the refused connection to be counted", 30)
    finally:
        for hog in hogs:
            hog.close()
    w.recover(RECOVERY_BOUND)
    verdict(w, w.report(connections_held=len(hogs)))
