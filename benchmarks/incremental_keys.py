"""What an incremental refresh costs per changed key (issue #22), on the driver-matrix workload, in one run.

1. The key-filtered query alone (the recompute of the changed keys, as the refresh runs it: keys in a
   temporary table with a unique index, analysed) at 100, 1,000 and 10,000 keys. Target: at most x12 time
   per x10 keys.
2. An incremental refresh of 100 and 1,000 changed keys through the library on a warm connection (as the
   operator and ``matview run`` run it) against the same refresh through ``matview refresh``: as a new
   process (interpreter, imports, file validation, connection, refresh), and the command's own work alone
   (``matview.cli.main`` called in this process: validation, a new connection, the refresh). Target: the
   command within 100 ms of the library. The interpreter's start with the command's imports is timed apart;
   the new processes run with their bytecode compiled, as an installed package does.
   Then the same command while a ``matview run`` serves the same file on the same database: the command hands
   the refresh to it over its control socket (cli/control.py) and prints its answer.

    python benchmarks/incremental_keys.py [--drivers 100000] [--rounds 3] [--dsn DSN]

Prints tables; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import yaml
from _server import bench_database
from incremental import load_workload, matrix_document, matrix_view

from matview import cli
from matview.api import sqltext
from matview.plan import capture, engine
from matview.plan.catalog import observe
from matview.plan.statements import wanted_names
from matview.refresh import record_build, refresh


def touch(conn: engine.Connection, drivers: list[int]) -> None:
    """A new trip for each driver: each becomes one changed key."""
    conn.execute(
        "INSERT INTO ops.trips (driver_id, trip_date) SELECT d, date '2026-02-01' FROM unnest(%s::int[]) d",
        (drivers,),
    )


def filtered_query_seconds(conn: engine.Connection, filtered: psycopg.sql.Composable, drivers: list[int]) -> float:
    """The key-filtered query over these drivers, as the incremental refresh runs it (its temporary key
    table, unique index and statistics included in the setup, not in the time)."""
    temporary = psycopg.sql.Identifier(*sqltext.CHANGED_KEYS_TABLE)
    with conn.transaction():
        conn.execute(
            psycopg.sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT unnest(%s::int[]) AS driver_id").format(
                psycopg.sql.Identifier(sqltext.CHANGED_KEYS_TABLE[1])
            ),
            (drivers,),
        )
        conn.execute(psycopg.sql.SQL("CREATE UNIQUE INDEX ON {} (driver_id)").format(temporary))
        conn.execute(psycopg.sql.SQL("ANALYZE {}").format(temporary))
        started = time.perf_counter()
        conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM ({}) AS q WHERE q.driver_id IN (SELECT driver_id FROM {})").format(
                filtered, temporary
            )
        ).fetchone()
        seconds = time.perf_counter() - started
        conn.execute("ROLLBACK")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drivers", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="repeats per measurement (medians)")
    parser.add_argument("--dsn", help="an existing server (default: a private one in a temp dir)")
    parser.add_argument(
        "--durable", action="store_true", help="fsync and synchronous_commit on (default off: a benchmark server)"
    )
    args = parser.parse_args()
    rng = random.Random(22)
    with bench_database(args.dsn, args.durable) as dsn, engine.connect(dsn) as conn:
        load_workload(conn, args.drivers, analyze=True)
        view = matrix_view()
        engine.apply(conn, view)
        record_build(conn, view)
        observed = observe(conn, view, wanted_names(view))
        assert observed.key_catalog is not None
        filtered = sqltext.embed(capture.key_filtered_query(view, observed.key_catalog).query)

        print("\n1. the key-filtered query alone (ms, median)")
        print("keys | ms | per key (µs) | x time per x10 keys")
        previous = None
        for keys in (100, 1_000, 10_000):
            seconds = statistics.median(
                filtered_query_seconds(conn, filtered, rng.sample(range(1, args.drivers + 1), keys))
                for _ in range(args.rounds)
            )
            growth = f"x{seconds / previous:.1f}" if previous else "-"
            print(f"{keys:,} | {seconds * 1000:.1f} | {seconds / keys * 1e6:.0f} | {growth}")
            previous = seconds

        folder = Path(tempfile.mkdtemp(prefix="matview-incremental-keys-"))
        spec_file = folder / "matrix.yaml"
        spec_file.write_text(yaml.safe_dump(matrix_document(mode="Incremental", interval="24h")))
        dsn_file = folder / "dsn"
        dsn_file.write_text(dsn)
        dsn_file.chmod(0o600)
        socket = folder / "run.sock"
        handing = [sys.executable, "-m", "matview.cli", "refresh", "--dsn-file", str(dsn_file), "--json"]
        handing += ["--control-socket", str(socket)]
        command = [*handing, "--in-process"]
        imports = [sys.executable, "-c", "import matview.cli, matview.cli.views, matview.refresh, matview.plan.engine"]
        # As installed: pip compiles the bytecode (the image's wheel install does), a laptop writes it on the first
        # run. A PYTHONDONTWRITEBYTECODE in this shell would time every import as a compilation from source.
        environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run(imports, check=True, env=environment)
        start_ms = 1000 * statistics.median(
            timed(lambda: subprocess.run(imports, check=True, env=environment)) for _ in range(3)
        )
        print(
            f"\n2. an incremental refresh, library (warm connection) vs `matview refresh` (ms, median); "
            f"the interpreter's start with the command's imports alone: {start_ms:.0f} ms"
        )
        serve = ["run", "--dsn-file", str(dsn_file), "--metrics-port", "0", "--control-socket", str(socket)]
        serve += ["--drift-check-seconds", "86400"]  # no drift check holds the view while the library refreshes
        run = subprocess.Popen(
            [sys.executable, "-m", "matview.cli", *serve, str(spec_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=environment,
        )
        try:
            while "refreshedBy" not in handed_refresh(handing, spec_file, environment):
                time.sleep(0.2)  # the run applies the file first; until then the command refreshes in process
            print(
                "keys | library | command's own work | difference | command, new process | difference | "
                "command handed to `matview run` | difference"
            )
            refresh(conn, view, "Incremental")  # warm: prepared statements, caches
            for keys in (100, 1_000):
                library, in_process, process, handed = [], [], [], []
                for _ in range(args.rounds):
                    touch(conn, rng.sample(range(1, args.drivers + 1), keys))
                    started = time.perf_counter()
                    result = refresh(conn, view, "Incremental")
                    library.append(time.perf_counter() - started)
                    assert result.result == "success" and result.keys_applied == keys, result
                    touch(conn, rng.sample(range(1, args.drivers + 1), keys))
                    with contextlib.redirect_stdout(io.StringIO()):
                        in_process.append(timed(lambda: cli.main([*command[3:], str(spec_file)])))
                    touch(conn, rng.sample(range(1, args.drivers + 1), keys))
                    process.append(
                        timed(
                            lambda: subprocess.run(
                                [*command, str(spec_file)], check=True, capture_output=True, env=environment
                            )
                        )
                    )
                    touch(conn, rng.sample(range(1, args.drivers + 1), keys))
                    started = time.perf_counter()
                    answer = handed_refresh(handing, spec_file, environment)
                    handed.append(time.perf_counter() - started)
                    assert '"refreshedBy"' in answer and f'"keysApplied": {keys}' in answer, answer
                lib_ms, own_ms, new_ms, handed_ms = (
                    1000 * statistics.median(t) for t in (library, in_process, process, handed)
                )
                own, new = f"{own_ms:.0f} | +{own_ms - lib_ms:.0f}", f"{new_ms:.0f} | +{new_ms - lib_ms:.0f}"
                print(f"{keys:,} | {lib_ms:.0f} | {own} | {new} | {handed_ms:.0f} | +{handed_ms - lib_ms:.0f}")
        finally:
            run.terminate()
            run.wait(timeout=60)


def handed_refresh(handing: list[str], spec_file: Path, environment: dict[str, str]) -> str:
    """`matview refresh --json` as a new process, handed to the run when it takes it; its output."""
    done = subprocess.run([*handing, str(spec_file)], check=True, capture_output=True, text=True, env=environment)
    return done.stdout


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
