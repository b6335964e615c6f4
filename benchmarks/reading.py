"""Reading views: the live view against the stored table, and keyset pages against OFFSET, in one run.

On the driver-matrix workload (100,000 drivers by default), stored as an incremental table with a live
view, it times, with 0, 100, 1,000 and 10,000 keys pending in the change log:

- a point read (one driver) and a 100-row page (by driver_id) from the live view and from the table;

and, with nothing pending, a 100-row page at depth 1, 100 and 1,000 pages by keyset (matview.client.page)
against the same pages by OFFSET. Medians of --rounds runs, each read on a warm connection, once as a
plain statement (planned every time) and once prepared (planned once, as an application's driver does).

    python benchmarks/reading.py --drivers 100000

Prints ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
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


def timed(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...], rounds: int, prepare: bool) -> float:
    samples = []
    for _ in range(rounds):
        clock = time.perf_counter()
        conn.execute(statement, params, prepare=prepare).fetchall()  # type: ignore[arg-type]
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
    view = validate_document(document)
    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
        conn.execute("SELECT ops.load_driver_matrix(%s)", (args.drivers,))
        engine.apply(conn, view)
        record_build(conn, view)
        conn.execute("ANALYZE")
        reader = psycopg.connect(dsn, autocommit=True)
        probe = args.drivers // 2
        rows: list[tuple[str, ...]] = []
        for pending in (int(p) for p in args.pending.split(",")):
            conn.execute("TRUNCATE ops.matrix_mv_changes")  # each level from a clean log
            pend(conn, pending, args.drivers)
            for prepare in (False, True):
                timings = {}
                for name, relation in (("table", "ops.matrix"), ("live", "ops.matrix_live")):
                    point = f"SELECT * FROM {relation} WHERE driver_id = %s"
                    page = f"SELECT * FROM {relation} WHERE driver_id > %s ORDER BY driver_id LIMIT 100"
                    timings[name] = (
                        timed(reader, point, (probe,), args.rounds, prepare),
                        timed(reader, page, (probe,), args.rounds, prepare),
                    )
                (tp, tg), (lp, lg) = timings["table"], timings["live"]
                rows.append(
                    (
                        str(pending),
                        "prepared" if prepare else "planned",
                        f"{tp * 1000:.2f}",
                        f"{lp * 1000:.2f}",
                        f"x{lp / tp:.1f}",
                        f"{tg * 1000:.2f}",
                        f"{lg * 1000:.2f}",
                        f"x{lg / tg:.1f}",
                    )
                )
        print(
            f"\nlive view vs stored table, {args.drivers} drivers (ms, median of {args.rounds}); target <= x2 up to "
            "1,000 pending"
        )
        table(("pending", "plan", "point table", "point live", "ratio", "page table", "page live", "ratio"), rows)

        conn.execute("TRUNCATE ops.matrix_mv_changes")
        pages: list[tuple[str, ...]] = []
        first = None
        for depth in (int(d) for d in args.depths.split(",")):
            cursor = None
            if depth > 1:  # walk there once (cursors are cheap); then time the page at that depth
                walked = client.page(reader, ("ops", "matrix"), order=["driver_id"], limit=100 * (depth - 1))
                cursor = walked.next
            keyset = []
            for _ in range(args.rounds):
                clock = time.perf_counter()
                client.page(reader, ("ops", "matrix"), order=["driver_id"], limit=100, after=cursor)
                keyset.append(time.perf_counter() - clock)
            offset = timed(
                reader,
                "SELECT * FROM ops.matrix ORDER BY driver_id LIMIT 100 OFFSET %s",
                (100 * (depth - 1),),
                args.rounds,
                prepare=False,
            )
            seconds = statistics.median(keyset)
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
    sys.exit(main())
