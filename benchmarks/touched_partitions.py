"""Rebuilding only the partitions the changes touch, against every partition and against incremental, in one run.

An incremental view of the driver-matrix workload, split by ``week_start`` into 52 weekly partitions
(``ops.leads.lead_date`` is its partition source). The same shape of change is made three times, and each
time refreshed a different way:

- **incremental**: the changed keys applied one by one (mode Incremental);
- **touched**: Auto's rebuild (the view's fullRebuildRatio makes Auto rebuild), which rebuilds only the
  partitions the changed keys' rows lie in;
- **all**: every partition rebuilt one at a time (mode Swap).

Shapes of change: new trips for every driver whose lead is in the newest week, or in the newest four
(recent activity, the usual case), the newest week's with one lead moved years back (its rows go to the DEFAULT
partition, which is rebuilt from the whole query), and 1% of all drivers spread over every week (the
worst case for the touched partitions: all of them are).

    python benchmarks/touched_partitions.py --drivers 200000

Prints durations and ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from _server import bench_database
from incremental import load_workload, matrix_document

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import RefreshResult, apply_and_record, refresh

FIRST_DAY = dt.date(2026, 1, 5)
DAYS = 364


def document() -> dict[str, Any]:
    """The incremental driver-matrix view of benchmarks/incremental.py, split by week (a unique index would have
    to include week_start: the plain one), whose fullRebuildRatio makes Auto rebuild whatever changed."""
    body = matrix_document(ratio=0.000001)
    body["metadata"]["name"] = "weekly"
    body["spec"].update(
        name="weekly",
        indexes=[{"columns": ["driver_id"]}],
        partitioning={
            "column": "week_start",
            "by": "Range",
            "period": "Week",
            "sources": [{"table": "ops.leads", "column": "lead_date"}],
        },
    )
    return body


def recent(weeks: int) -> Callable[[engine.Connection, int], int]:
    """A new trip for every driver whose lead is in the newest ``weeks`` weeks of the data."""
    since = FIRST_DAY + dt.timedelta(days=DAYS - 7 * weeks)

    def make(conn: engine.Connection, salt: int) -> int:
        cursor = conn.execute(
            "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 1 + (%s %% 3) FROM ops.leads "
            "WHERE lead_date >= %s",
            (salt, since),
        )
        return cursor.rowcount

    return make


def recent_and_one_into_default(conn: engine.Connection, salt: int) -> int:
    """The newest week's trips, and one lead moved years back, to a week without a partition (its rows go to the
    DEFAULT partition)."""
    conn.execute("UPDATE ops.leads SET lead_date = date '2001-01-03' WHERE driver_id = %s", (1000 + salt,))
    return recent(1)(conn, salt)


def spread(conn: engine.Connection, salt: int) -> int:
    """A new trip for 1% of the drivers, every week alike."""
    cursor = conn.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 2 FROM ops.leads "
        "WHERE (driver_id + %s) %% 100 = 0",
        (salt,),
    )
    return cursor.rowcount


def timed(conn: engine.Connection, view: MaterializedView, mode: str | None) -> RefreshResult:
    conn.execute("VACUUM ANALYZE ops.trips")  # each way starts from the same state of the sources
    result = refresh(conn, view, mode)
    assert result.result == "success", result
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", type=int, default=200_000)
    parser.add_argument("--dsn", help="an existing database (default: a private server)")
    args = parser.parse_args()
    shapes: list[tuple[str, Callable[[engine.Connection, int], int]]] = [
        ("newest week", recent(1)),
        ("newest 4 weeks", recent(4)),
        ("newest week, and one lead into DEFAULT", recent_and_one_into_default),
        ("1% of drivers, every week", spread),
    ]
    rows = []
    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        load_workload(conn, args.drivers)
        conn.execute("UPDATE ops.leads SET lead_date = %s + (driver_id %% %s)::int", (FIRST_DAY, DAYS))
        conn.execute("CREATE INDEX ON ops.leads (lead_date)")
        conn.execute("ANALYZE")
        view = validate_document(document())
        started = time.perf_counter()
        apply_and_record(conn, view)
        print(f"built the partitioned incremental view in {time.perf_counter() - started:.1f}s")
        conn.execute("VACUUM ANALYZE")
        salt = 0
        for label, make in shapes:
            seconds: dict[str, float] = {}
            keys, touched, total = 0, 0, 0
            for way, mode in (("incremental", "Incremental"), ("touched", None), ("all", "Swap")):
                salt += 1
                make(conn, salt)
                result = timed(conn, view, mode)
                seconds[way] = result.duration_seconds
                if way == "incremental":
                    keys = result.keys_applied or 0
                if way == "touched":
                    assert result.partitions is not None, result
                    touched = len(result.partitions.rebuilt)
                    total = touched + result.partitions.untouched
                    print(f"{label}: {result.reason}")
            rows.append((label, keys, seconds, touched, total))

    print()
    print("| change | keys | incremental | touched partitions | all partitions | touched / all | touched / incr. |")
    print("|---|---|---|---|---|---|---|")
    for label, keys, seconds, touched, total in rows:
        print(
            f"| {label} | {keys:,} | {seconds['incremental']:.2f} s "
            f"| {seconds['touched']:.2f} s ({touched} of {total}) | {seconds['all']:.2f} s "
            f"| x{seconds['touched'] / seconds['all']:.3f} "
            f"| x{seconds['touched'] / seconds['incremental']:.2f} |"
        )


if __name__ == "__main__":
    main()
