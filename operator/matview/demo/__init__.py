"""The demo and ``matview compare``: the seed's slow reporting view made fast, with numbers.

``matview demo`` loads the driver-matrix workload (sql/examples/driver_matrix) into a database — an
embedded PostgreSQL when none is given — applies examples/driver-matrix.yaml, refreshes it in each
mode, prints how much faster the original fix's query shapes run on the materialized view than on
the plain view, then keeps the scheduler running with /metrics until Ctrl-C.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from psycopg import sql

from matview.api.spec import MaterializedView
from matview.outcomes import Outcome
from matview.plan.observed import Connection
from matview.refresh import RefreshResult, apply_and_record, refresh

REPOSITORY = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Shape:
    """One query shape of the original fix, with its parameters."""

    label: str
    template: sql.SQL
    """A constant: {relation} and {column} are filled in as identifiers, values are parameters."""
    params: tuple[Any, ...] = ()
    column: str | None = None

    def statement(self, relation: sql.Identifier) -> sql.Composed:
        if self.column is not None:
            return self.template.format(relation=relation, column=sql.Identifier(self.column))
        return self.template.format(relation=relation)


def seed_shapes(conn: Connection, relation: sql.Identifier) -> list[Shape]:
    """The seed's queries: first page, origin_tag + week_start, one driver, pending count."""
    row = conn.execute(
        sql.SQL(
            "SELECT origin_tag, week_start, driver_id FROM {} ORDER BY driver_id "
            "OFFSET (SELECT count(*) / 2 FROM {}) LIMIT 1"
        ).format(relation, relation)
    ).fetchone()
    tag, week, driver = row if row else ("cabinet", None, 1)
    return [
        Shape("first page, unfiltered", sql.SQL("SELECT * FROM {relation} ORDER BY week_start, driver_name LIMIT 25")),
        Shape(
            "origin_tag + week_start",
            sql.SQL("SELECT * FROM {relation} WHERE origin_tag = %s AND week_start = %s ORDER BY driver_name LIMIT 25"),
            (tag, week),
        ),
        Shape("one driver", sql.SQL("SELECT * FROM {relation} WHERE driver_id = %s"), (driver,)),
        Shape("pending count", sql.SQL("SELECT count(*) FROM {relation} WHERE only_pending")),
    ]


def execution_ms(
    conn: Connection, statement: sql.Composed, params: tuple[Any, ...], repeats: int, timeout_seconds: float = 600
) -> float:
    """Median server-side execution time (EXPLAIN ANALYZE, BUFFERS) over repeats."""
    times = []
    for _ in range(repeats):
        with conn.transaction():
            conn.execute(
                sql.SQL("SELECT set_config('statement_timeout', %s, true)"), (f"{int(timeout_seconds * 1000)}ms",)
            )
            row = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement, params).fetchone()
        plan = row[0] if row else [{}]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        times.append(float(plan[0]["Execution Time"]))
    return statistics.median(times)


def compare(
    conn: Connection,
    shapes: list[Shape],
    slow: sql.Identifier,
    fast: sql.Identifier,
    slow_repeats: int = 3,
    fast_repeats: int = 15,
) -> list[tuple[str, float, float]]:
    """(label, slow ms, fast ms) for each shape."""
    return [
        (
            s.label,
            execution_ms(conn, s.statement(slow), s.params, slow_repeats),
            execution_ms(conn, s.statement(fast), s.params, fast_repeats),
        )
        for s in shapes
    ]


def table(rows: list[tuple[str, float, float]], slow_label: str, fast_label: str) -> str:
    lines = [f"{'query shape':<26} {slow_label:>14} {fast_label:>14} {'speed-up':>10}"]
    for label, slow, fast in rows:
        lines.append(f"{label:<26} {slow:>11.2f} ms {fast:>11.3f} ms {slow / max(fast, 0.001):>9.0f}x")
    return "\n".join(lines)


@contextmanager
def step(what: str, out: Callable[[str], None]) -> Iterator[None]:
    out(f"-> {what} ...")
    started = time.monotonic()
    yield
    out(f"   done in {time.monotonic() - started:.1f} s")


def workload_sql() -> str:
    packaged = resources.files("matview") / "_driver_matrix.sql"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (REPOSITORY / "sql/examples/driver_matrix/schema.sql").read_text(encoding="utf-8")


def example_yaml() -> str:
    packaged = resources.files("matview") / "_driver_matrix.yaml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (REPOSITORY / "examples/driver-matrix.yaml").read_text(encoding="utf-8")


def example_view() -> MaterializedView:
    from matview.api.validation import load_documents

    return load_documents(example_yaml(), "examples/driver-matrix.yaml")[0]


def run_demo(
    conn: Connection,
    drivers: int,
    out: Callable[[str], None] = print,
    on_refresh: Callable[[MaterializedView, RefreshResult], None] | None = None,
) -> dict[str, Any]:
    """Load, apply, refresh in each mode, compare; returns what it printed, for tests and --json.
    on_refresh sees every refresh result (the CLI counts them in the demo's /metrics)."""
    view = example_view()
    with step("creating the driver-matrix workload (8 CTEs, 7 LEFT JOINs, a FULL OUTER JOIN)", out):
        conn.execute(workload_sql())  # the shipped workload file, not user input
    with step(f"generating data for {drivers:,} drivers", out):
        conn.execute(sql.SQL("SELECT ops.load_driver_matrix(%s)"), (drivers,))
    with step(
        f"applying {view.relation} with {len(view.indexes)} indexes and "
        f"{len(view.supporting_indexes)} supporting indexes",
        out,
    ):
        apply_and_record(conn, view)
    durations: dict[str, float] = {}
    for mode in ("Concurrent", "Swap", "Full"):
        with step(f"refreshing in mode {mode}", out):
            outcome = refresh(conn, view, mode)
            if on_refresh is not None:
                on_refresh(view, outcome)
            if outcome.result != Outcome.SUCCESS:
                raise RuntimeError(f"refresh {mode} failed: {outcome.message}")
            durations[mode] = outcome.duration_seconds
    plain = sql.Identifier("ops", "v_payments_driver_matrix_cabinet")
    materialized = sql.Identifier(view.schema, view.name)
    with step("timing the original fix's queries on the plain view and on the materialized view", out):
        rows = compare(conn, seed_shapes(conn, materialized), plain, materialized)
    out("")
    out(table(rows, "plain view", "materialized"))
    out("")
    out("refresh duration by mode: " + ", ".join(f"{m} {s:.2f} s" for m, s in durations.items()))
    return {"relation": view.relation, "queries": rows, "refresh_seconds": durations}
