"""Incremental refresh against build-and-swap on the driver-matrix workload, in one run.

For each share of drivers changed (1, 5, 10, 20 and 50 % by default) it writes the same kind of change
(a trip for each chosen driver, a payment for a tenth of them), then times an Auto refresh (the choice
Auto makes from the durations it measured before: the build, and the earlier rounds), an Incremental
refresh and a Swap refresh of the same view, each after its own fresh change of that size, and prints
how far Auto was from the faster of the two; the longest wait of a reader doing indexed lookups
meanwhile; and the overhead of change capture on writers (single-row UPDATEs, 100,000-row INSERT
batches) against the same writes with the capture triggers disabled, alternated so that noise hits both
sides alike.

    python benchmarks/incremental.py --drivers 100000

Prints ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import yaml
from _server import bench_database
from refresh_modes import Reader

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.plan import capture, engine
from matview.refresh import apply_and_record, refresh

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["public.drivers", "ops.leads", "ops.trips", "ops.claims", "ops.payments"]


def matrix_view(ratio: float | None = None, capture: str = "Triggers", **refresh: str) -> MaterializedView:
    return validate_document(matrix_document(ratio, capture, **refresh))


def matrix_document(ratio: float | None = None, capture: str = "Triggers", **refresh: str) -> dict[str, Any]:
    """The driver-matrix view; ratio, when given, overrides Auto's measured choice (fullRebuildRatio)."""
    incremental: dict[str, Any] = {
        "keyColumns": ["driver_id"],
        "sources": [{"table": t, "columns": ["driver_id"]} for t in SOURCES],
        "capture": capture,
    }
    if ratio is not None:
        incremental["fullRebuildRatio"] = ratio
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": "matrix", "namespace": "bench"},
        "spec": {
            "schema": "ops",
            "name": "matrix",
            "storage": "Table",
            "query": "SELECT * FROM ops.v_payments_driver_matrix_cabinet",
            "indexes": [{"columns": ["driver_id"], "unique": True}, {"columns": ["funnel_status"]}],
            "incremental": incremental,
            "refresh": {"timeout": "2h", **refresh},
        },
    }


def load_workload(conn: engine.Connection, drivers: int, analyze: bool = False) -> None:
    """The driver-matrix schema (sql/examples/driver_matrix) with this many drivers, its sources indexed by
    driver; analysed when asked (the planner then knows the sizes before the first refresh)."""
    conn.execute("DROP SCHEMA IF EXISTS ops CASCADE")
    conn.execute((ROOT / "sql/examples/driver_matrix/schema.sql").read_text())
    started = time.perf_counter()
    conn.execute("SELECT ops.load_driver_matrix(%s)", (drivers,))
    for source in ("trips", "claims", "payments", "leads"):
        conn.execute(f"CREATE INDEX ON ops.{source} (driver_id)")
    if analyze:
        conn.execute("ANALYZE")
    print(f"loaded {drivers:,} drivers in {time.perf_counter() - started:.0f}s")


def change(conn: engine.Connection, drivers: int, share: float, salt: int) -> int:
    """Touch share of the drivers (a new trip each, a payment for every tenth); return how many."""
    step = max(1, round(1 / share))
    conn.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 2 FROM ops.leads "
        "WHERE (driver_id + %s) %% %s = 0",
        (salt, step),
    )
    conn.execute(
        "INSERT INTO ops.payments (driver_id, milestone_value, paid_at, amount) "
        "SELECT driver_id, 1, lead_date + 3, 1 FROM ops.leads WHERE (driver_id + %s) %% %s = 0",
        (salt, step * 10),
    )
    return drivers // step


def timed_refresh(
    conn: engine.Connection, dsn: str, view: MaterializedView, mode: str | None
) -> tuple[float, float, str]:
    with Reader(dsn, "SELECT funnel_status FROM ops.matrix WHERE driver_id = 4242") as reader:
        result = refresh(conn, view, mode)
    assert result.result == "success", result
    return result.duration_seconds, reader.longest, result.mode


def write_overhead(conn: engine.Connection, view: MaterializedView, rounds: int) -> list[tuple[str, float, float]]:
    """(workload, seconds without capture, seconds with capture), medians over alternated rounds."""
    trigger_names = list(capture.trigger_names(view).values())

    def set_capture(enabled: bool) -> None:
        verb = "ENABLE" if enabled else "DISABLE"
        for name in trigger_names:
            conn.execute(f'ALTER TABLE ops.trips {verb} TRIGGER "{name}"')

    def single_updates() -> float:
        started = time.perf_counter()
        for trip in range(1, 2001):
            conn.execute("UPDATE ops.trips SET trip_date = trip_date WHERE trip_id = %s", (trip * 37,))
        return time.perf_counter() - started

    def batch_insert() -> float:
        started = time.perf_counter()
        conn.execute(
            "INSERT INTO ops.trips (driver_id, trip_date) SELECT g % 50000 + 1, date '2026-03-01' "
            "FROM generate_series(1, 100000) g"
        )
        seconds = time.perf_counter() - started
        conn.execute("DELETE FROM ops.trips WHERE trip_date = date '2026-03-01'")
        return seconds

    results = []
    for label, work in (("2,000 single-row UPDATEs", single_updates), ("100,000-row INSERT batch", batch_insert)):
        without, with_capture = [], []
        for _ in range(rounds):
            set_capture(False)
            without.append(work())
            set_capture(True)
            with_capture.append(work())
        results.append((label, statistics.median(without), statistics.median(with_capture)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", type=int, default=100_000)
    parser.add_argument("--shares", default="0.01,0.05,0.1,0.2,0.5", help="shares of drivers changed")
    parser.add_argument("--rounds", type=int, default=3, help="repeats per measurement (medians)")
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    parser.add_argument("--lag-minutes", type=float, default=5, help="length of the target-lag run (0 skips it)")
    parser.add_argument("--target-lag", default="1m")
    parser.add_argument("--writes-per-second", type=float, default=5)
    parser.add_argument(
        "--durable",
        action="store_true",
        help="fsync and synchronous_commit on (default off: the worst case for capture)",
    )
    parser.add_argument("--overhead-only", action="store_true", help="measure only the write overhead")
    parser.add_argument(
        "--capture",
        choices=("Triggers", "LogicalDecoding"),
        default="Triggers",
        help="incremental.capture (LogicalDecoding: the sources get REPLICA IDENTITY FULL)",
    )
    args = parser.parse_args()

    logical = args.capture == "LogicalDecoding"
    with bench_database(args.dsn, args.durable, logical=logical) as dsn, engine.connect(dsn) as conn:
        load_workload(conn, args.drivers, analyze=True)  # as a live database is: the build plans well
        if logical:
            for source in SOURCES[1:]:  # public.drivers is keyed by driver_id already
                conn.execute(f"ALTER TABLE {source} REPLICA IDENTITY FULL")
        view = matrix_view(capture=args.capture)
        apply_and_record(conn, view)  # the build is Auto's first measured full rebuild
        salt = 0
        rows = []
        for share in () if args.overhead_only else (float(s) for s in args.shares.split(",")):
            measured: dict[str, list[float]] = {"Incremental": [], "Auto": [], "Swap": []}
            waits: dict[str, float] = {}
            used: list[str] = []
            keys = 0
            for _ in range(args.rounds):
                # Auto first: it chooses from what earlier rounds and shares measured, never from this one.
                for mode in ("Auto", "Incremental", "Swap"):
                    salt += 1
                    keys = change(conn, args.drivers, share, salt)
                    seconds, wait, ran = timed_refresh(conn, dsn, view, None if mode == "Auto" else mode)
                    measured[mode].append(seconds)
                    waits[mode] = max(waits.get(mode, 0.0), wait)
                    if mode == "Auto":
                        used.append(ran[0])
            incremental, auto, swap = (statistics.median(measured[m]) for m in ("Incremental", "Auto", "Swap"))
            rows.append(
                (
                    f"{share:.1%}",
                    f"{keys:,}",
                    f"{swap:.3f}",
                    f"{incremental:.3f}",
                    f"x{swap / incremental:.2f}",
                    f"{auto:.3f} ({''.join(used)})",
                    f"{auto / min(swap, incremental):.2f}",
                    f"{waits['Incremental'] * 1000:.0f}",
                )
            )
        header = (
            "changed",
            "keys",
            "Swap s",
            "Incremental s",
            "Swap/Incr",
            "Auto s (ran: I/S each round)",
            "Auto/faster",
            "read wait ms",
        )
        if rows:
            table(header, rows)
            print()
        if logical:
            engine.delete(conn, view)  # the slot goes with it (and a private server's data directory after)
            return
        overhead = write_overhead(conn, view, args.rounds)
        table(
            ("writes to ops.trips", "no capture s", "capture s", "overhead"),
            [(label, f"{a:.3f}", f"{b:.3f}", f"{(b / a - 1):+.1%}") for label, a, b in overhead],
        )
        refresh(conn, view, "Swap")  # the overhead runs disabled capture: start the lag run from a clean state
        if args.lag_minutes > 0 and not args.overhead_only:
            print()
            target_lag_run(dsn, args)


def target_lag_run(dsn: str, args: argparse.Namespace) -> None:
    """`matview run` keeps the view within targetLag while a writer trickles changes; sample the age of the
    oldest unapplied change every second."""
    document = matrix_document(targetLag=args.target_lag)
    folder = Path(tempfile.mkdtemp(prefix="matview-lag-"))
    (folder / "matrix.yaml").write_text(yaml.safe_dump(document))
    serve = ["run", str(folder), "--dsn", dsn, "--metrics-port", "0", "--control-socket", str(folder / "run.sock")]
    runner = subprocess.Popen(
        [sys.executable, "-m", "matview.cli", *serve],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "run.log", "w"),  # noqa: SIM115 - closed with the process
    )
    samples: list[float] = []
    stop = threading.Event()

    def trickle() -> None:
        rng = random.Random(1)
        with psycopg.connect(dsn, autocommit=True) as writer:
            while not stop.is_set():
                driver = rng.randint(1, args.drivers)
                writer.execute(
                    "INSERT INTO ops.trips (driver_id, trip_date) SELECT driver_id, lead_date + 1 FROM ops.leads "
                    "WHERE driver_id = %s",
                    (driver,),
                )
                time.sleep(1 / args.writes_per_second)

    writer = threading.Thread(target=trickle)
    try:
        time.sleep(5)  # the runner starts and applies (nothing to change)
        writer.start()
        deadline = time.monotonic() + args.lag_minutes * 60
        with psycopg.connect(dsn, autocommit=True) as probe:
            while time.monotonic() < deadline:
                row = probe.execute(
                    "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(mv_changed_at)), 0) "
                    "FROM ops.matrix_mv_changes"
                ).fetchone()
                samples.append(float(row[0]) if row else 0.0)
                time.sleep(1)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
    samples.sort()

    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    table(
        ("targetLag", "writes/s", "samples", "staleness p50 s", "p99 s", "max s"),
        [
            (
                args.target_lag,
                f"{args.writes_per_second:g}",
                str(len(samples)),
                f"{quantile(0.5):.1f}",
                f"{quantile(0.99):.1f}",
                f"{samples[-1]:.1f}",
            )
        ],
    )


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
