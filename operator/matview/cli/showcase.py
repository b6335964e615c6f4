"""The verbs for trying it: ``matview demo`` (the slow reporting view made fast and kept fresh) and
``matview compare`` (EXPLAIN ANALYZE of representative queries on a view and its fallback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from matview.api.spec import MaterializedView
from matview.cli.common import EXIT_OK, Batch, database_url
from matview.errors import FieldError, SpecError
from matview.plan import engine


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio
    import datetime as dt
    import signal
    import tempfile

    from matview import demo
    from matview.cli.files import FileFeeder
    from matview.observe.metrics import RefreshMetrics
    from matview.refresh import schedule
    from matview.refresh.refresher import Refresher

    if args.dsn or args.dsn_file or os.environ.get("DATABASE_URL"):
        dsn = database_url(args)
    else:
        from matview.embedded.localpg import ensure_embedded

        print(f"-> starting an embedded PostgreSQL in {args.embedded_dir} (pgserver)", flush=True)
        dsn = ensure_embedded(Path(args.embedded_dir))
        print(f"   {dsn} (stop it with 'matview embedded-stop', remove it with 'matview embedded-clean')", flush=True)
    metrics = RefreshMetrics()

    def counted(view: MaterializedView, result: Any) -> None:
        metrics.track(view, schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC)))
        metrics.record(view.namespace, view.resource_name, result)  # /metrics shows the demo's own refreshes

    with engine.connect(dsn) as conn:
        summary = demo.run_demo(conn, args.drivers, lambda line: print(line, flush=True), counted)
    if args.json:
        print(json.dumps(summary, default=str, indent=2))
    if args.once:
        return EXIT_OK
    metrics.serve(args.metrics_port, "127.0.0.1")
    workdir = tempfile.TemporaryDirectory(prefix="matview-demo-")  # removed when the demo ends
    spec_file = Path(workdir.name) / "driver-matrix.yaml"
    spec_file.write_text(demo.example_yaml())
    refresher = Refresher(metrics)
    logging.getLogger("matview").setLevel(logging.INFO)  # from here on, every refresh is worth a line

    async def loop() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        # Announced only now: Ctrl-C is handled from this point on.
        print(
            f"\nkeeping {summary['relation']} fresh (hourly); metrics on "
            f"http://127.0.0.1:{args.metrics_port}/metrics — Ctrl-C to stop",
            flush=True,
        )
        await FileFeeder(dsn, [spec_file], refresher).run(stop)

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        pass  # Ctrl-C before the loop took over: stopping is what was asked for
    finally:
        refresher.close()
        workdir.cleanup()
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from psycopg import sql

    from matview import demo
    from matview.api import sqltext

    try:
        fallback = sqltext.parse_qualified_name(args.fallback)
    except ValueError as exc:
        raise SpecError([FieldError("--fallback", str(exc))]) from None
    batch = Batch(args.files)
    if batch.problems:
        return batch.finish(args, [], str)
    with engine.connect(database_url(args)) as conn:
        for view, _ in batch.views:
            fast = sql.Identifier(view.schema, view.name)
            slow = sql.Identifier(*fallback)
            shapes = [demo.Shape("first 25 rows", sql.SQL("SELECT * FROM {relation} LIMIT 25"))]
            for index in view.indexes:
                column = index.columns[0]
                value = conn.execute(
                    sql.SQL("SELECT {} FROM {} WHERE {} IS NOT NULL LIMIT 1").format(
                        sql.Identifier(column), fast, sql.Identifier(column)
                    )
                ).fetchone()
                if value is not None:
                    shapes.append(
                        demo.Shape(
                            f"{column} = ?",
                            sql.SQL("SELECT * FROM {relation} WHERE {column} = %s"),
                            (value[0],),
                            column=column,
                        )
                    )
            rows = demo.compare(conn, shapes, slow, fast, args.repeats, args.repeats * 5)
            print(f"{view.relation} vs {fallback[0]}.{fallback[1]} (EXPLAIN ANALYZE execution time, medians)")
            print(demo.table(rows, "fallback", "materialized"))
    return EXIT_OK
