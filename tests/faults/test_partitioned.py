"""Faults in the middle of a rebuild a partition at a time (issue #25), against `matview run` and a real
PostgreSQL: the view is the fault suite's totals split by week, its partitions rebuilt one by one, each build
held in app.pause. A crash of the server or a SIGKILL of the runner between two partitions must lose no row,
leave no staging or retired partition behind, and be resumed by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.harness import Scenario, spec
from tests.faults.test_standalone import RECOVERY_BOUND, killed_and_restarted, verdict

World = Callable[..., Scenario]
pytestmark = pytest.mark.timeout(240)

#: The totals per kind and week of app.events: a week's rows come from that week's events (app.events.at is
#: the partition source), and each partition's build waits in app.pause.
WEEKLY_QUERY = (
    "SELECT kind, week, count(*) AS n, sum(amount) AS total "
    "FROM (SELECT kind, amount, CAST(date_trunc('week', at) AS date) AS week FROM app.events) e, "
    "(SELECT app.pause() AS p) s GROUP BY kind, week"
)
WEEKLY_EXPECTED = (
    "SELECT kind, CAST(date_trunc('week', at) AS date), count(*), sum(amount) FROM app.events GROUP BY 1, 2 "
    "ORDER BY 1, 2"
)
WEEKLY_ACTUAL = "SELECT kind, week, n, total FROM app.totals ORDER BY kind, week"
#: The partitions a rebuild had swapped in (each records when its rebuild began in its comment).
REBUILT = (
    "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = 'app.totals'::regclass AND obj_description(c.oid, 'pg_class') LIKE '%built%'"
)
LEFT_BESIDE = "SELECT count(*) FROM pg_class WHERE relname ~ '_mv_(staging|retired)'"


def weekly_spec() -> dict[str, Any]:
    document = spec(query=WEEKLY_QUERY)
    document["spec"].update(
        storage="Table",
        indexes=[{"columns": ["kind", "week"], "unique": True}],
        partitioning={
            "column": "week",
            "by": "Range",
            "period": "Week",
            "sources": [{"table": "app.events", "column": "at"}],
        },
    )
    return document


def weekly(world: World, name: str) -> Scenario:
    """The scenario's events spread over six weeks, and the view split by week, built and fresh."""
    w = world(name)
    with w.admin() as conn:
        conn.execute("ALTER TABLE app.events ADD COLUMN at date NOT NULL DEFAULT date '2026-01-05'")
        conn.execute("UPDATE app.events SET at = date '2026-01-05' + (id % 42)")
    w.expected_sql, w.actual_sql = WEEKLY_EXPECTED, WEEKLY_ACTUAL
    w.write_spec(weekly_spec())
    w.start_runner()
    w.wait(w.fresh, "the first build", 60)
    w.start_reader()
    return w


def rebuilt(w: Scenario) -> int:
    with w.admin() as conn:
        row = conn.execute(REBUILT).fetchone()
    return int(row[0]) if row else 0


def resumed(w: Scenario) -> bool:
    """A runner logged a refresh that resumed a rebuild after the partitions it had finished."""
    logs = "".join(log.read_text() for _, _, log in w.runners)
    return "more rebuilt already by a rebuild that stopped" in logs


def test_postgresql_stopped_immediately_between_two_partitions(world: World) -> None:
    w = weekly(world, "crash mid per-partition rebuild")
    before = rebuilt(w)
    w.set_slow(1)
    w.add_rows()
    w.wait(lambda: rebuilt(w) >= before + 2, "two partitions rebuilt", 60)
    w.wait(w.refreshing, "the next partition's build", 30)
    w.stop_server("immediate")
    w.injected = 1
    w.wait(lambda: w.scrape_all()["failures"] >= 1, "the runner to count the refresh the crash killed", 30)
    w.start_server()
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)
    with w.admin() as conn:
        assert conn.execute(LEFT_BESIDE).fetchone() == (0,), w.logs()
    # The partitions done before the crash were not rebuilt again (its data is live before its line is logged).
    w.wait(lambda: resumed(w), "the resumed rebuild's end in the runner's log", 30)
    verdict(w, w.report())


def test_runner_killed_between_two_partitions_and_restarted_at_once(world: World) -> None:
    w = weekly(world, "runner SIGKILLed mid per-partition rebuild")
    before = rebuilt(w)
    w.set_slow(0.5)
    w.add_rows()
    w.wait(lambda: rebuilt(w) >= before + 2, "two partitions rebuilt", 60)
    w.set_slow(20)  # the partition being built now, or the next, waits far longer than the check interval
    w.wait(w.refreshing, "a partition's build in flight", 30)
    orphan_seconds = killed_and_restarted(w)
    w.set_slow(0)
    w.recover(RECOVERY_BOUND)
    with w.admin() as conn:
        assert conn.execute(LEFT_BESIDE).fetchone() == (0,), w.logs()
    w.wait(lambda: resumed(w), "the resumed rebuild's end in the runner's log", 30)
    verdict(w, w.report(orphan_seconds=round(orphan_seconds, 1)), injected_failures=False)
