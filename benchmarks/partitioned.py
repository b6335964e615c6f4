"""A weekly-partitioned view against the same view unpartitioned, on the driver-matrix workload, in one run.

Both are storage Table views of the same query. The partitioned one is split by ``week_start`` (52 weekly
partitions: the benchmark spreads the leads over 364 days) and declares ``ops.leads.lead_date`` as its
partition source, so a full refresh rebuilds it a partition at a time. Printed side by side:

- a full rebuild: the whole unpartitioned view (build-and-swap) vs every partition one at a time;
- one partition's rebuild (its build, swap and drop), against the full rebuild of either;
- the peak extra disk of each full rebuild (pg_database_size sampled every 20 ms, less the size before),
  against the largest partition;
- the longest lookup of a reader (a process of its own, as an application) looking one driver up by index
  throughout each rebuild, beside the same on a table no rebuild locks (the busy machine's share);
- retention of the 4 oldest weeks: the step ``retain`` runs after a refresh (DETACH and DROP of their
  partitions) vs DELETE of the same rows (and the VACUUM that gives their space back) from the
  unpartitioned table.

    python benchmarks/partitioned.py --drivers 200000

Prints ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from _server import bench_database
from incremental import load_workload

from matview.api.spec import MaterializedView, PartitionPeriod
from matview.api.validation import validate_document
from matview.plan import engine, partitions
from matview.plan.executor import execute
from matview.plan.statements import Plan
from matview.plan.upstream import resolve_relations
from matview.refresh import apply_and_record, facts, refresh

ROOT = Path(__file__).resolve().parents[1]
LOOKUP = "SELECT funnel_status FROM ops.{name} WHERE driver_id = 4242"
#: The same kind of lookup on a table no rebuild locks: how long a lookup takes on this machine while the rebuild
#: keeps both cores busy, which no lock explains.
CONTROL = "SELECT lead_date FROM ops.leads WHERE driver_id = 4242"


def document(name: str, partitioned: bool, retain: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "schema": "ops",
        "name": name,
        "storage": "Table",
        "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
        "indexes": [{"columns": ["driver_id"]}, {"columns": ["funnel_status"]}],
        "refresh": {"timeout": "2h", "mode": "Swap"},
    }
    if partitioned:
        spec["partitioning"] = {
            "column": "week_start",
            "by": "Range",
            "period": "Week",
            "sources": [{"table": "ops.leads", "column": "lead_date"}],
            **({"retain": retain} if retain else {}),
        }
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": name.replace("_", "-"), "namespace": "bench"},
        "spec": spec,
    }


#: The reader's own process: looks the row up until its stdin closes, then prints its longest lookup.
_READER = """
import sys, threading, time, psycopg
dsn, query = sys.argv[1], sys.argv[2]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
longest = 0.0
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute(query).fetchall()
    print("ready", flush=True)
    while not stop.is_set():
        started = time.perf_counter()
        conn.execute(query).fetchall()
        longest = max(longest, time.perf_counter() - started)
        time.sleep(0.005)
print(longest, flush=True)
"""


class ProcessReader:
    """Looks one row up by index, over and over, in a process of its own, as an application would: a reader
    thread in this process also waits for the interpreter while the engine's thread runs Python (every
    session of this process once fell silent for 87 ms while the server answered each lookup in under 12 ms),
    which is no wait the database caused. Its first lookup is not timed: on a view of 53 partitions the first
    query of a session loads their descriptions into its caches (about 50 ms)."""

    def __init__(self, dsn: str, query: str) -> None:
        self.dsn, self.query = dsn, query
        self.longest = 0.0

    def __enter__(self) -> ProcessReader:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _READER, self.dsn, self.query],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        assert self._process.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *_: Any) -> None:
        output, _errors = self._process.communicate()
        self.longest = float(output.strip().splitlines()[-1])


#: The catalogs a rebuild writes rows to (a table, its indexes, its comment, its statistics, its bounds).
CATALOGS = (
    "pg_class",
    "pg_attribute",
    "pg_depend",
    "pg_description",
    "pg_statistic",
    "pg_index",
    "pg_inherits",
    "pg_constraint",
    "pg_type",
    "pg_shdepend",
)


def catalog_bytes(conn: engine.Connection) -> int:
    row = conn.execute(
        "SELECT sum(pg_total_relation_size(('pg_catalog.' || c)::regclass)) FROM unnest(%s::text[]) AS c",
        (list(CATALOGS),),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class DiskPeak:
    """Samples the database's size while a rebuild runs; the peak above the size before it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._size(conn))
                time.sleep(0.02)

    def __enter__(self) -> DiskPeak:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.before = self.peak = self._size(conn)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.before


class StepClock(logging.Handler):
    """When each step of a per-partition rebuild began (the executor logs each as it starts): a swap holds the
    view's exclusive lock from its start to the next step's, which bounds how long any reader can wait."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.starts: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.starts.append((time.perf_counter(), record.getMessage()))

    def __enter__(self) -> StepClock:
        logger = logging.getLogger("matview.plan.executor")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *_: Any) -> None:
        logging.getLogger("matview.plan.executor").removeHandler(self)
        self.starts.append((time.perf_counter(), "end"))

    def longest_swap(self) -> float:
        pairs = zip(self.starts, self.starts[1:], strict=False)
        return max(
            (after[0] - before[0] for before, after in pairs if "swap the rebuilt partition" in before[1]), default=0
        )


def full_rebuild(
    conn: engine.Connection, dsn: str, view: MaterializedView
) -> tuple[float, int, float, int, float, float]:
    """(seconds, peak extra bytes, longest reader lookup, bytes the catalogs grew by, longest partition swap,
    longest lookup of an untouched table meanwhile) of one full refresh."""
    catalogs = catalog_bytes(conn)
    with (
        DiskPeak(dsn) as disk,
        ProcessReader(dsn, LOOKUP.format(name=view.name)) as reader,
        ProcessReader(dsn, CONTROL) as control,
        StepClock() as steps,
    ):
        result = refresh(conn, view, "Swap")
    assert result.result == "success", result
    return (
        result.duration_seconds,
        disk.extra,
        reader.longest,
        catalog_bytes(conn) - catalogs,
        steps.longest_swap(),
        control.longest,
    )


def one_partition(conn: engine.Connection, dsn: str, view: MaterializedView, week: dt.date) -> tuple[float, float]:
    """(seconds, longest reader wait) of rebuilding the partition of one week: its build, swap and drop."""
    now = dt.datetime.now(dt.UTC)
    oid = facts.inspect(conn, view).oid
    assert oid is not None
    found, _ = facts.partitions_to_rebuild(conn, view, oid, now)
    steps = partitions.rebuild_steps(view, found, None, now, resolve_relations(conn, view))
    name = partitions.partition_name(view.name, partitions.range_label(week))
    mine = tuple(s for s in steps if name in s.description or f"_mv_retired_{name[-9:]}" in s.description)
    assert len(mine) == 3, [s.description for s in steps]
    with ProcessReader(dsn, LOOKUP.format(name=view.name)) as reader:
        started = time.perf_counter()
        execute(conn, Plan(view, mine, log_steps=False), engine.settings_for(view))
        seconds = time.perf_counter() - started
    return seconds, reader.longest


def largest_partition(conn: engine.Connection, name: str) -> int:
    row = conn.execute(
        "SELECT max(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = %s::regclass",
        (f"ops.{name}",),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def retention(conn: engine.Connection, weeks: list[dt.date]) -> tuple[float, float, int]:
    """(seconds of the retention step retiring the partitions of weeks, seconds to DELETE the same rows from
    the unpartitioned view and VACUUM it, rows those weeks held)."""
    row = conn.execute(
        "SELECT count(*) FROM ops.plain WHERE week_start >= %s AND week_start < %s",
        (weeks[0], weeks[-1] + dt.timedelta(days=7)),
    ).fetchone()
    rows = int(row[0]) if row else 0
    # The view with a window that, as of a fixed day, leaves out exactly these weeks: weeks back from that
    # day's week to the week after them.
    today = dt.datetime(2026, 12, 4, 12, tzinfo=dt.UTC)
    window = (partitions.period_of(today.date(), PartitionPeriod.WEEK) - (weeks[-1] + dt.timedelta(days=7))).days // 7
    retained = validate_document(document("weekly", True, retain=f"{window}w"))
    assert partitions.retention_cutoff(retained, today) == weeks[-1] + dt.timedelta(days=7)
    step = partitions.maintenance_step(retained, today)
    assert step is not None
    started = time.perf_counter()
    execute(conn, Plan(retained, (step,), log_steps=False), engine.settings_for(retained))
    dropped = time.perf_counter() - started
    left = {partitions.partition_name("weekly", partitions.range_label(week)) for week in weeks}
    remaining = conn.execute(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'ops.weekly'::regclass AND c.relname = ANY(%s)",
        (list(left),),
    )
    assert remaining.fetchone() == (0,), "the retention step left a partition it should have retired"
    started = time.perf_counter()
    conn.execute(
        "DELETE FROM ops.plain WHERE week_start >= %s AND week_start < %s",
        (weeks[0], weeks[-1] + dt.timedelta(days=7)),
    )
    conn.execute("VACUUM ops.plain")
    deleted = time.perf_counter() - started
    return dropped, deleted, rows


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", type=int, default=200_000)
    parser.add_argument("--dsn", help="an existing database (default: a private server)")
    args = parser.parse_args()
    with bench_database(args.dsn) as dsn, engine.connect(dsn) as conn:
        load_workload(conn, args.drivers)
        # 52 weeks of leads: the partitions a year of weekly reporting would have.
        conn.execute("UPDATE ops.leads SET lead_date = date '2026-01-05' + (driver_id % 364)::int")
        conn.execute("CREATE INDEX ON ops.leads (lead_date)")
        conn.execute("ANALYZE")
        plain = validate_document(document("plain", False))
        weekly = validate_document(document("weekly", True))
        started = time.perf_counter()
        apply_and_record(conn, plain)
        print(f"built the unpartitioned view in {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        apply_and_record(conn, weekly)
        print(f"built the partitioned view in {time.perf_counter() - started:.1f}s")
        # Steady state: what autovacuum would do to freshly built tables is done before anything is measured (its
        # analyses right after a build invalidate every reader's plans of 53 partitions: 40-60 ms lookups then).
        conn.execute("VACUUM ANALYZE ops.plain, ops.weekly")
        count = conn.execute("SELECT count(*) - 1 FROM pg_inherits WHERE inhparent = 'ops.weekly'::regclass")
        row = count.fetchone()
        print(f"{row[0] if row else '?'} weekly partitions and a DEFAULT one")

        plain_full, plain_disk, plain_wait, plain_catalogs, _, plain_control = full_rebuild(conn, dsn, plain)
        weekly_full, weekly_disk, weekly_wait, weekly_catalogs, weekly_swap, weekly_control = full_rebuild(
            conn, dsn, weekly
        )
        week = dt.date(2026, 6, 1)
        one, one_wait = one_partition(conn, dsn, weekly, week)
        largest = largest_partition(conn, "weekly")
        whole = conn.execute("SELECT pg_total_relation_size('ops.plain')").fetchone()
        oldest = [dt.date(2026, 1, 5) + dt.timedelta(days=7 * i) for i in range(4)]
        dropped, deleted, rows = retention(conn, oldest)

    print()
    print("| | unpartitioned | weekly partitions | ratio | target |")
    print("|---|---|---|---|---|")
    ratio = weekly_full / plain_full
    print(f"| full rebuild | {plain_full:.2f} s | {weekly_full:.2f} s (one at a time) | x{ratio:.2f} | - |")
    print(
        f"| one partition's rebuild (week of {week}) | - | {one:.3f} s | x{one / plain_full:.3f} of the unpartitioned "
        f"full rebuild, x{one / weekly_full:.3f} of the partitioned one | <= x0.1 |"
    )
    print(
        f"| peak extra disk of a full rebuild | {mib(plain_disk)} (the view is {mib(int(whole[0]) if whole else 0)}) "
        f"| {mib(weekly_disk)} (largest partition {mib(largest)}) | {weekly_disk / max(largest, 1):.2f} partitions "
        f"| <= 2 partitions |"
    )
    print(
        f"| the catalogs grew by (rows for new tables, indexes, statistics; inside the peak, which is net of the "
        f"space the old copies' free-space and visibility maps gave back) | {mib(plain_catalogs)} "
        f"| {mib(weekly_catalogs)} | - | - |"
    )
    print(
        f"| longest reader lookup (full rebuild) | {plain_wait * 1000:.1f} ms | {weekly_wait * 1000:.1f} ms "
        f"(one partition: {one_wait * 1000:.1f} ms) | - | <= 50 ms |"
    )
    print(
        f"| longest lookup of a table the rebuild does not lock, meanwhile (the busy machine, no wait) "
        f"| {plain_control * 1000:.1f} ms | {weekly_control * 1000:.1f} ms | - | - |"
    )
    print(
        f"| longest a partition's swap held the view (what a reader can wait) | - | {weekly_swap * 1000:.1f} ms "
        f"| - | <= 50 ms |"
    )
    print(
        f"| 4 oldest weeks retired ({rows:,} rows) | DELETE + VACUUM {deleted:.3f} s "
        f"| retire (DETACH + DROP) {dropped:.3f} s "
        f"| x{dropped / deleted:.3f} | - |"
    )


if __name__ == "__main__":
    main()
