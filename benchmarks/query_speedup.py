"""Plain view vs materialized view for the original fix's query shapes, at a realistic scale.

Loads the driver-matrix workload (sql/examples/driver_matrix) with --drivers drivers (about 20 trips
each), applies examples/driver-matrix.yaml, and prints, per query shape, the median server-side
execution time (EXPLAIN ANALYZE) on each and their ratio. No assertions: read the ratios.

    python benchmarks/query_speedup.py --drivers 100000
"""

from __future__ import annotations

import argparse

from _server import bench_database
from psycopg import sql

from matview import demo
from matview.plan import engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="runs per shape on the plain view (x5 on the MV)")
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    args = parser.parse_args()
    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        conn.execute(demo.workload_sql())
        conn.execute(sql.SQL("SELECT ops.load_driver_matrix(%s)"), (args.drivers,))
        counts = conn.execute("SELECT (SELECT count(*) FROM ops.trips), (SELECT count(*) FROM ops.leads)").fetchone()
        view = demo.example_view()
        engine.apply(conn, view)
        materialized = sql.Identifier(view.schema, view.name)
        plain = sql.Identifier("ops", "v_payments_driver_matrix_cabinet")
        rows = demo.compare(
            conn, demo.seed_shapes(conn, materialized), plain, materialized, args.repeats, args.repeats * 5
        )
    assert counts is not None
    print(
        f"{args.drivers:,} drivers, {counts[0]:,} trips; medians of {args.repeats} (view) and "
        f"{args.repeats * 5} (MV) EXPLAIN ANALYZE runs"
    )
    print(demo.table(rows, "plain view", "materialized"))


if __name__ == "__main__":
    main()
