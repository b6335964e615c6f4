"""What change capture costs a writer, per trigger body, measured side by side in one run (issue #23).

Identical tables, each with another capture on it, written in turn by the same pgbench client: every
pgbench "transaction" sends one autocommit statement to each table, so the machine's noise lands on all
of them alike, and ``pgbench -r`` reports each statement's mean latency. The tables:

- ``none``: no trigger (the baseline every ratio is against);
- ``none2``: no trigger either: how far two identical tables drift apart in one run, the noise floor of
  every other row;
- ``empty``: the statement triggers with transition tables, calling a function that returns at once;
- ``const``: the same triggers inserting one constant log row (the floor of any capture that logs);
- ``format5``: the capture the engine shipped before (one function for every source and operation,
  branching on them, DISTINCT and UNION over the transition tables, HAVING count(*) > 0);
- ``shipped``: what ``engine.apply`` installs today, for a real incremental view over that table;
- ``logical``: the same view with ``capture: LogicalDecoding`` (the table in a publication, a slot, and
  ``REPLICA IDENTITY FULL``, since the view's key is not the table's primary key); nothing runs in the
  writer's transaction, so what it costs is the larger WAL of FULL;
- ``appendonly``: the shipped capture with the table declared append-only by its id: its INSERTs fire no
  trigger (each refresh reads them by range), its UPDATEs are captured as in ``shipped``.

The server runs with ``wal_level = logical`` for every table (the baseline included): what that level
itself adds to the WAL is a server-wide cost, not measured here.

Each pgbench transaction sends a single-row UPDATE, a single-row INSERT and a 100-row UPDATE to each
table (their order rotated from one run to the next); it runs --pgbench-rounds times with one client,
then as often with --clients (8) concurrent ones. Each cell is the median over those runs of the
statement's mean latency, and its ratio is the median of the per-run ratios against ``none`` in the same
run (a run's noise lands on every table of it alike, while the machine's load drifts between runs); the
spread of those ratios follows in brackets. Then batch writes (one 100,000-row INSERT, one 10,000-row
UPDATE) to each table in turn, medians of --rounds.

    python benchmarks/capture.py [--dsn DSN] [--seconds 20] [--pgbench-rounds 3] [--rounds 5] [--durable]

Prints per-statement costs and ratios; no assertions (these machines are noisy).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from _server import bench_database

from matview.api.validation import validate_document
from matview.plan import engine
from matview.refresh import record_build

ROWS = 200_000
DRIVERS = 100_000
REFERENCING = {
    "INSERT": "REFERENCING NEW TABLE AS n",
    "UPDATE": "REFERENCING NEW TABLE AS n OLD TABLE AS o",
    "DELETE": "REFERENCING OLD TABLE AS o",
}


#: The rows each operation's capture reads from its transition tables.
ROWS_OF = {
    "INSERT": "SELECT driver_id FROM n",
    "UPDATE": "SELECT driver_id FROM n UNION ALL SELECT driver_id FROM o",
    "DELETE": "SELECT driver_id FROM o",
}


def _format5_body(table: str, _operation: str) -> str:
    """The body the engine shipped until capture format 5 (one source), for comparison."""
    insert = (
        "INSERT INTO bench.{t}_log (driver_id) SELECT pg_catalog.array_agg(d.k) FROM (SELECT DISTINCT driver_id FROM "
        "{rows}) AS d (k) HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0::pg_catalog.int8;"
    )
    return f"""
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE'::pg_catalog.text THEN RETURN NULL; END IF;
    IF TG_TABLE_SCHEMA OPERATOR(pg_catalog.=) 'bench'::pg_catalog.name
       AND TG_TABLE_NAME OPERATOR(pg_catalog.=) '{table}'::pg_catalog.name THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT'::pg_catalog.text THEN
            {insert.format(t=table, rows="n")}
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE'::pg_catalog.text THEN
            {insert.format(t=table, rows="o")}
        ELSE
            INSERT INTO bench.{table}_log (driver_id) SELECT pg_catalog.array_agg(d.k)
            FROM (SELECT driver_id FROM n UNION SELECT driver_id FROM o) AS d (k)
            HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0::pg_catalog.int8;
        END IF;
        RETURN NULL;
    END IF;
    RETURN NULL;
END"""


def _hand_made(conn: psycopg.Connection[Any], table: str, body: Callable[[str, str], str] | None) -> None:
    """Statement triggers on bench.<table>, each calling a function of its own made by body(table, operation)
    (None: no trigger at all)."""
    if body is None:
        return
    conn.execute(
        f"CREATE TABLE bench.{table}_log (driver_id int[], mv_changed_at timestamptz NOT NULL "
        "DEFAULT clock_timestamp(), mv_full_rebuild text)"
    )
    for operation, referencing in REFERENCING.items():
        function = f"bench.{table}_capture_{operation.lower()}"
        conn.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            f"AS $body${body(table, operation)}$body$"
        )
        conn.execute(
            f"CREATE TRIGGER {table}_{operation.lower()} AFTER {operation} ON bench.{table} {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def _shipped(conn: psycopg.Connection[Any], table: str, capture: str = "Triggers", append_only: bool = False) -> None:
    """An incremental view over bench.<table>, applied by the engine: its capture is what ships (append_only:
    the table declared append-only by its id, so its INSERTs fire no trigger)."""
    if capture == "LogicalDecoding":
        conn.execute(f"ALTER TABLE bench.{table} REPLICA IDENTITY FULL")
    document = {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": f"{table}-view", "namespace": "bench"},
        "spec": {
            "schema": "bench",
            "name": f"{table}_view",
            "storage": "Table",
            "query": f"SELECT driver_id, sum(v) AS v FROM bench.{table} GROUP BY driver_id",
            "indexes": [{"columns": ["driver_id"], "unique": True}],
            "incremental": {
                "keyColumns": ["driver_id"],
                "sources": [
                    {
                        "table": f"bench.{table}",
                        "columns": ["driver_id"],
                        **({"appendOnly": {"column": "id"}} if append_only else {}),
                    }
                ],
                "capture": capture,
            },
            "refresh": {"interval": "1h"},
        },
    }
    view = validate_document(document)
    with psycopg.connect(conn.info.dsn, autocommit=True) as engine_conn:
        if engine.apply(engine_conn, view).built:
            record_build(engine_conn, view)


VARIANTS: dict[str, Callable[[psycopg.Connection[Any], str], None]] = {
    "none": lambda conn, table: _hand_made(conn, table, None),
    "none2": lambda conn, table: _hand_made(conn, table, None),
    "empty": lambda conn, table: _hand_made(conn, table, lambda _t, _o: "BEGIN RETURN NULL; END"),
    "const": lambda conn, table: _hand_made(
        conn, table, lambda t, _o: f"BEGIN INSERT INTO bench.{t}_log (driver_id) VALUES ('{{1}}'); RETURN NULL; END"
    ),
    "format5": lambda conn, table: _hand_made(conn, table, _format5_body),
    "shipped": _shipped,
    "logical": lambda conn, table: _shipped(conn, table, "LogicalDecoding"),
    "appendonly": lambda conn, table: _shipped(conn, table, append_only=True),
}


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
        conn.execute("CREATE SCHEMA bench")
        for name, install in VARIANTS.items():
            # Every table's ids come from its identity, as an append-only source's must (one at a time, from its
            # own sequence), so every variant's INSERT draws from a sequence alike.
            conn.execute(
                f"CREATE TABLE bench.{name} (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
                "driver_id int NOT NULL, v int NOT NULL)"
            )
            conn.execute(
                f"INSERT INTO bench.{name} SELECT g, g %% %s, 0 FROM generate_series(1, %s) g", (DRIVERS, ROWS)
            )
            conn.execute(f"SELECT setval(pg_get_serial_sequence('bench.{name}', 'id'), %s)", (ROWS,))
            conn.execute(f"CREATE INDEX ON bench.{name} (driver_id)")
            install(conn, name)
        conn.execute("VACUUM ANALYZE")


def find_tool(name: str, package: str = "postgresql") -> str:
    """A command on PATH, or one of Debian's PostgreSQL binaries (not on PATH there); exits naming the package
    to install when it is neither."""
    found = shutil.which(name) or next((str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}")), None)
    if found is None:
        installed_by_ci = " (.ci/run does)" if package == "postgresql" else ""
        raise SystemExit(f"{name} not found: install Debian's {package} package{installed_by_ci}")
    return found


def rotated(items: list[str], turn: int) -> list[str]:
    """items, starting at the turn-th (modulo their number): so that none is always first or last."""
    start = turn % len(items)
    return items[start:] + items[:start]


def single_row_statements(dsn: str, seconds: float, clients: int = 1, turn: int = 0) -> dict[str, dict[str, float]]:
    """Mean latency (ms) of a single-row UPDATE and INSERT and a 100-row UPDATE on each table, in one pgbench
    run of clients concurrent writers; the tables' order in each transaction rotated by turn, so that no
    capture always writes first or last."""
    pgbench = find_tool("pgbench")
    script = [f"\\set id random(1, {ROWS})"]
    for name in rotated(list(VARIANTS), turn):
        script.append(f"UPDATE bench.{name} SET v = v + 1 WHERE id = :id;")
        script.append(f"INSERT INTO bench.{name} (driver_id, v) VALUES (:id % {DRIVERS}, 0);")
        script.append(f"UPDATE bench.{name} SET v = v + 1 WHERE id BETWEEN :id AND :id + 99;")
    path = Path(tempfile.mkdtemp(prefix="matview-capture-")) / "writes.sql"
    path.write_text("\n".join(script) + "\n")
    run = subprocess.run(
        [
            pgbench,
            *("-n", "-M", "prepared", "-r", "-T", str(int(seconds)), "-f", str(path)),
            *("-c", str(clients), "-j", str(min(clients, 2))),
            dsn,
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"pgbench failed: {run.stderr.strip()}")
    latencies: dict[str, dict[str, float]] = {name: {} for name in VARIANTS}
    for line in run.stdout.splitlines():
        # "<latency ms> <failures> <statement>", one line per statement of the script
        parts = line.split()
        table = next((word.removeprefix("bench.") for word in parts if word.startswith("bench.")), None)
        if table in latencies and len(parts) > 2 and parts[2] in ("UPDATE", "INSERT"):
            batch = "BETWEEN" in parts
            latencies[table]["UPDATE100" if batch else parts[2]] = float(parts[0])
    return latencies


def repeated(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, list[float]]]]:
    """Per table and statement: the median latency over runs, and each run's ratio against ``none`` in that run."""
    return {
        name: {
            key: (
                statistics.median(run[name][key] for run in runs),
                [run[name][key] / run["none"][key] - 1 for run in runs],
            )
            for key in runs[0][name]
        }
        for name in VARIANTS
    }


def batches(dsn: str, rounds: int) -> dict[str, dict[str, tuple[float, list[float]]]]:
    """Median seconds of one 100,000-row INSERT and one 10,000-row UPDATE on each table, tables in turn; the
    ratio is of the medians (the tables are written one after the other, so a round pairs nothing)."""
    times: dict[str, dict[str, list[float]]] = {name: {"INSERT": [], "UPDATE": []} for name in VARIANTS}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            for name in VARIANTS:
                top = conn.execute(f"SELECT max(id) FROM bench.{name}").fetchone()
                started = time.perf_counter()
                conn.execute(
                    f"INSERT INTO bench.{name} (driver_id, v) SELECT g %% %s, 0 FROM generate_series(1, 100000) g",
                    (DRIVERS,),
                )
                times[name]["INSERT"].append(time.perf_counter() - started)
                started = time.perf_counter()
                conn.execute(f"UPDATE bench.{name} SET v = v + 1 WHERE id BETWEEN 1 AND 10000")
                times[name]["UPDATE"].append(time.perf_counter() - started)
                conn.execute(f"DELETE FROM bench.{name} WHERE id > %s", (top[0] if top else 0,))
            for name in VARIANTS:
                conn.execute(f"VACUUM bench.{name}")
    medians = {name: {op: statistics.median(values) for op, values in ops.items()} for name, ops in times.items()}
    return {
        name: {op: (value, [value / medians["none"][op] - 1]) for op, value in ops.items()}
        for name, ops in medians.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a database to use (default: a private server)")
    parser.add_argument("--seconds", type=float, default=20, help="length of the single-row pgbench run")
    parser.add_argument("--pgbench-rounds", type=int, default=3, help="pgbench runs per client count (medians)")
    parser.add_argument("--rounds", type=int, default=5, help="batch rounds (medians)")
    parser.add_argument("--durable", action="store_true", help="fsync and synchronous_commit on")
    parser.add_argument("--clients", type=int, default=8, help="concurrent writers of the second pgbench run")
    args = parser.parse_args()
    with bench_database(args.dsn, durable=args.durable, logical=True) as dsn:
        setup(dsn)
        single = repeated([single_row_statements(dsn, args.seconds, 1, turn) for turn in range(args.pgbench_rounds)])
        concurrent = repeated(
            [single_row_statements(dsn, args.seconds, args.clients, turn) for turn in range(args.pgbench_rounds)]
        )
        batch = batches(dsn, args.rounds)
    columns = [
        ("1-row UPDATE", single, "UPDATE", 1.0),
        ("1-row INSERT", single, "INSERT", 1.0),
        ("100-row UPDATE", single, "UPDATE100", 1.0),
        (f"1-row UPDATE x{args.clients}", concurrent, "UPDATE", 1.0),
        (f"100-row UPDATE x{args.clients}", concurrent, "UPDATE100", 1.0),
        ("100k-row INSERT", batch, "INSERT", 1000.0),
        ("10k-row UPDATE", batch, "UPDATE", 1000.0),
    ]
    print(f"{'capture':10s} " + " ".join(f"{title:>36s}" for title, *_ in columns))
    for name in VARIANTS:
        cells = [_cell(*measured[name][key], scale) for _, measured, key, scale in columns]
        print(f"{name:10s} " + " ".join(f"{cell:>36s}" for cell in cells))


def _cell(latency: float, ratios: list[float], scale: float) -> str:
    spread = f" [{min(ratios):+.1%} … {max(ratios):+.1%}]" if len(ratios) > 1 else ""
    return f"{latency * scale:8.3f} ms {statistics.median(ratios):+7.1%}{spread}"


if __name__ == "__main__":
    main()
