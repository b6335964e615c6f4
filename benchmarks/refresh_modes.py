"""Refresh modes compared on one PostgreSQL, in one run: ratios to a floor, and reader waits.

The floor is ``CREATE TABLE ... AS`` of the same query: the least work any refresh
can do. For two shapes — a cheap query over a large table (millions of rows) and
an expensive query (the driver-matrix workload: joins and aggregates) — and two
change fractions, it times Full, Concurrent, Swap and Auto (after Auto has
gathered its evidence), and the longest a reader waited for one indexed lookup
on the view while each refresh ran.

    python benchmarks/refresh_modes.py --rows 2000000 --drivers 50000

Prints a table; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from _server import bench_database

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import refresh

ROOT = Path(__file__).resolve().parents[1]


def spec(name: str, query: str, unique: list[str]) -> MaterializedView:
    return validate_document(
        {
            "apiVersion": "matview.dev/v1alpha1",
            "kind": "MaterializedView",
            "metadata": {"name": name.replace("_", "-"), "namespace": "bench"},
            "spec": {
                "schema": "bench",
                "name": name,
                "query": query,
                "indexes": [{"columns": unique, "unique": True}],
                "refresh": {"timeout": "2h"},
            },
        }
    )


class Reader:
    """Looks one row up by index, over and over, and keeps the longest wait."""

    def __init__(self, dsn: str, sql: str) -> None:
        self.dsn, self.sql = dsn, sql
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                started = time.perf_counter()
                conn.execute(self.sql).fetchall()
                self.longest = max(self.longest, time.perf_counter() - started)
                time.sleep(0.005)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def floor_seconds(conn: engine.Connection, query: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        conn.execute("DROP TABLE IF EXISTS bench.floor_copy")
        started = time.perf_counter()
        conn.execute(f"CREATE TABLE bench.floor_copy AS {query}")
        times.append(time.perf_counter() - started)
    conn.execute("DROP TABLE IF EXISTS bench.floor_copy")
    return statistics.median(times)


def measure(
    conn: engine.Connection, dsn: str, view: MaterializedView, mode: str, change: str, lookup: str, repeats: int
) -> tuple[float, float, str]:
    times, waits, used = [], [], ""
    for _ in range(repeats):
        conn.execute(change)
        with Reader(dsn, lookup) as reader:
            result = refresh(conn, view, None if mode == "Auto" else mode)
        assert result.result == "success", result
        times.append(result.duration_seconds)
        waits.append(reader.longest)
        used = result.mode
    return statistics.median(times), max(waits), used


def run_shape(
    conn: engine.Connection,
    dsn: str,
    label: str,
    view: MaterializedView,
    changes: dict[str, str],
    lookup: str,
    repeats: int,
) -> list[tuple[str, ...]]:
    engine.apply(conn, view)
    floor = floor_seconds(conn, view.query.text, repeats)
    rows: list[tuple[str, ...]] = []
    for fraction, change in changes.items():
        for mode in ("Full", "Concurrent", "Swap"):
            seconds, wait, _ = measure(conn, dsn, view, mode, change, lookup, repeats)
            rows.append((label, fraction, mode, f"{seconds:.2f}", f"x{seconds / floor:.2f}", f"{wait * 1000:.0f}"))
        for _ in range(3):  # let Auto gather evidence on this change fraction
            refresh(conn, view)
        seconds, wait, used = measure(conn, dsn, view, "Auto", change, lookup, repeats)
        rows.append(
            (label, fraction, f"Auto->{used}", f"{seconds:.2f}", f"x{seconds / floor:.2f}", f"{wait * 1000:.0f}")
        )
    rows.insert(0, (label, "-", "floor (CTAS)", f"{floor:.2f}", "x1.00", "-"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the large table (cheap shape)")
    parser.add_argument("--drivers", type=int, default=50_000, help="drivers of the driver-matrix workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    args = parser.parse_args()

    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        conn.execute("DROP SCHEMA IF EXISTS bench CASCADE; CREATE SCHEMA bench")
        conn.execute("CREATE TABLE bench.big (id bigint PRIMARY KEY, kind int NOT NULL, amount int NOT NULL)")
        conn.execute("INSERT INTO bench.big SELECT g, g %% 100, g %% 1000 FROM generate_series(1, %s) g", (args.rows,))
        conn.execute("ANALYZE bench.big")
        cheap = spec("big_copy", "SELECT id, kind, amount FROM bench.big", ["id"])
        rows = run_shape(
            conn,
            dsn,
            f"cheap ({args.rows:,} rows)",
            cheap,
            {
                "0.1%": "UPDATE bench.big SET amount = amount + 1 WHERE id % 1000 = 0",
                "10%": "UPDATE bench.big SET amount = amount + 1 WHERE id % 10 = 0",
            },
            "SELECT amount FROM bench.big_copy WHERE id = 12345",
            args.repeats,
        )

        conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
        conn.execute("SELECT ops.load_driver_matrix(%s)", (args.drivers,))
        expensive = spec("matrix", "SELECT * FROM ops.v_payments_driver_matrix_cabinet", ["driver_id"])
        rows += run_shape(
            conn,
            dsn,
            f"expensive ({args.drivers:,} drivers)",
            expensive,
            {
                "0.1%": "UPDATE ops.payments SET amount = amount + 1 WHERE payment_id % 1000 = 0",
                "10%": "UPDATE ops.payments SET amount = amount + 1 WHERE payment_id % 10 = 0",
            },
            "SELECT funnel_status FROM bench.matrix WHERE driver_id = 4242",
            args.repeats,
        )

    header = ("shape", "changed", "mode", "median s", "vs floor", "longest read ms")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
