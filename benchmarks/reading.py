"""Reading views: the live view against the stored table, and keyset pages against OFFSET, in one run.

On the driver-matrix workload (100,000 drivers by default), stored as an incremental table with a live
view, it times, with 0, 100, 1,000 and 10,000 keys pending in the change log:

- a point read of a driver with no pending change from the live view and from the table, and one of a
  driver with a pending change from the live view (it recomputes that driver: the price of freshness),
  prepared (planned once, as psycopg does by itself from a statement's fifth run);
- a 100-row page after a cursor (matview.client.page, by driver_id) from the live view and the table;

and, with nothing pending, a 100-row page at depth 1, 100 and 1,000 pages by keyset (matview.client.page)
against the same pages by OFFSET. Medians of --rounds runs, each read on a warm connection. The source
tables have the driver_id indexes the example declares (supportingIndexes): the pending keys are
computed by index lookups, as an incremental refresh computes them.

    python benchmarks/reading.py --drivers 100000

Prints ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from _server import bench_database
from incremental import matrix_document, table

from matview import client
from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import record_build

ROOT = Path(__file__).resolve().parents[1]


WARMUP = 5
"""Runs before timing: psycopg prepares a statement from its fifth run, as an application's pool would have."""


def timed(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...], rounds: int, prepare: bool) -> float:
    for _ in range(WARMUP):
        conn.execute(statement, params, prepare=prepare).fetchall()
    samples = []
    for _ in range(rounds):
        clock = time.perf_counter()
        conn.execute(statement, params, prepare=prepare).fetchall()
        samples.append(time.perf_counter() - clock)
    return statistics.median(samples)


def pend(conn: engine.Connection, keys: int, drivers: int) -> None:
    """Leave `keys` drivers changed and unapplied (a trip each)."""
    if keys:
        step = max(1, drivers // keys)
        conn.execute(
            "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 1 FROM ops.leads "
            "WHERE driver_id %% %s = 0 LIMIT %s",
            (step, keys),
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def ratio(measured: float, baseline: float) -> str:
    return f"x{measured / baseline:.1f}"


def untouched_probe(conn: engine.Connection, drivers: int) -> int:
    """A driver with no pending change (most reads are of one: 1,000 pending of 100,000 is 1 %), if any."""
    pending = conn.execute(
        "SELECT coalesce(array_agg(k), '{}') FROM ops.matrix_mv_changes, unnest(driver_id) AS k"
    ).fetchone()
    taken = set(pending[0]) if pending else set()
    return next((d for d in range(drivers // 2, drivers) if d not in taken), drivers // 2)


def pending_probe(conn: engine.Connection) -> int | None:
    """A driver with a pending change, so that a live point read has one to compute."""
    found = conn.execute("SELECT driver_id[1] FROM ops.matrix_mv_changes LIMIT 1").fetchone()
    return int(found[0]) if found and found[0] is not None else None


def cursor_at(reader: psycopg.Connection[Any], relation: str, rows: int) -> str | None:
    """The cursor after the first rows of the relation (each relation's own: a cursor names its definition)."""
    cursor = None
    while rows > 0:
        step = min(rows, client.MAX_LIMIT)
        cursor = client.page(reader, ("ops", relation), order=["driver_id"], limit=step, after=cursor).next
        rows -= step
    return cursor


def timed_page(reader: psycopg.Connection[Any], relation: str, cursor: str | None, rounds: int) -> float:
    for _ in range(WARMUP):
        client.page(reader, ("ops", relation), order=["driver_id"], limit=100, after=cursor)
    samples = []
    for _ in range(rounds):
        clock = time.perf_counter()
        client.page(reader, ("ops", relation), order=["driver_id"], limit=100, after=cursor)
        samples.append(time.perf_counter() - clock)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", type=int, default=100_000)
    parser.add_argument("--pending", default="0,100,1000,10000")
    parser.add_argument("--depths", default="1,100,1000")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    args = parser.parse_args()
    document = matrix_document(ratio=1.0)
    document["spec"]["incremental"]["liveView"] = True
    document["spec"]["supportingIndexes"] = [
        {"table": f"ops.{table}", "columns": ["driver_id"]} for table in ("leads", "trips", "claims", "payments")
    ]
    view = validate_document(document)
    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
        conn.execute("SELECT ops.load_driver_matrix(%s)", (args.drivers,))
        engine.apply(conn, view)
        record_build(conn, view)
        conn.execute("ANALYZE")
        reader = psycopg.connect(dsn, autocommit=True)
        rows: list[tuple[str, ...]] = []
        for pending in (int(p) for p in args.pending.split(",")):
            conn.execute("TRUNCATE ops.matrix_mv_changes")  # each level from a clean log
            pend(conn, pending, args.drivers)
            changed = pending_probe(conn)
            untouched = untouched_probe(conn, args.drivers)
            point = "SELECT * FROM {} WHERE driver_id = %s"
            table_point = timed(reader, point.format("ops.matrix"), (untouched,), args.rounds, True)
            live_point = timed(reader, point.format("ops.matrix_live"), (untouched,), args.rounds, True)
            row: list[str] = [str(pending), ms(table_point), ms(live_point), ratio(live_point, table_point)]
            if changed is not None:
                pending_point = timed(reader, point.format("ops.matrix_live"), (changed,), args.rounds, True)
                row += [ms(pending_point), ratio(pending_point, table_point)]
            else:
                row += ["-", "-"]
            paged = [
                timed_page(reader, relation, cursor_at(reader, relation, args.drivers // 2), args.rounds)
                for relation in ("matrix", "matrix_live")
            ]
            row += [ms(paged[0]), ms(paged[1]), ratio(paged[1], paged[0])]
            rows.append(tuple(row))
        print(
            f"\nlive view vs stored table, {args.drivers} drivers (ms, median of {args.rounds}, prepared); "
            "target <= x2 up to 1,000 pending"
        )
        table(
            (
                "pending",
                "point table",
                "point live",
                "ratio",
                "point live, a pending key",
                "ratio",
                "page table",
                "page live",
                "ratio",
            ),
            rows,
        )

        conn.execute("TRUNCATE ops.matrix_mv_changes")
        pages: list[tuple[str, ...]] = []
        first = None
        for depth in (int(d) for d in args.depths.split(",")):
            cursor = cursor_at(reader, "matrix", 100 * (depth - 1))  # walk there once; time the page there
            offset = timed(
                reader,
                "SELECT * FROM ops.matrix ORDER BY driver_id LIMIT 100 OFFSET %s",
                (100 * (depth - 1),),
                args.rounds,
                prepare=False,
            )
            seconds = timed_page(reader, "matrix", cursor, args.rounds)
            first = first or seconds
            pages.append(
                (
                    str(depth),
                    f"{seconds * 1000:.2f}",
                    f"{offset * 1000:.2f}",
                    f"x{offset / seconds:.1f}",
                    f"x{seconds / first:.2f}",
                )
            )
        print("\nkeyset page vs OFFSET, 100 rows (ms); target: keyset at depth 1,000 within x1.5 of depth 1")
        table(("depth", "keyset", "offset", "offset/keyset", "keyset vs depth 1"), pages)
        reader.close()


if __name__ == "__main__":
    main()
