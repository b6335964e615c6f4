"""Where a capture trigger's time goes inside the writer's backend: its CPU per statement, by function (issue #23).

``capture.py`` times statements from the client, where the trigger's share is a few microseconds inside a
latency that also holds the network, the client and the commit. This script samples the server process
that runs the statements instead (Linux ``perf``, the ``cpu-clock`` event, so it also works in a VM with no
hardware counters) while pgbench sends single-row UPDATEs to one of ``capture.py``'s tables at a time, the
tables in a new order each round. It prints the backend's CPU per statement for each capture, split into
user space and kernel, and, for one pair of captures, the functions whose CPU per statement grew most.

The kernel column is coarse: in a VM the timer's samples land where interrupts are enabled again, so the
user-space column is the one to compare.

    python benchmarks/capture_cpu.py [--seconds 15] [--rounds 3] [--tables none,empty,const,shipped]
                                     [--compare const,shipped] [--durable]

Needs ``perf`` (Debian's ``linux-perf``) and the right to sample a process of this user. No assertions.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from _server import bench_database
from capture import ROWS, VARIANTS, find_tool, rotated, setup
from psycopg.conninfo import make_conninfo

#: Samples a second; each stands for 1/FREQUENCY s of the backend's CPU.
FREQUENCY = 4000

#: One line of ``perf report -n --sort dso,symbol``: percent, samples, object, [k] or [.], symbol.
_REPORT_LINE = re.compile(r"\s+[\d.]+%\s+(\d+)\s+\S+\s+\[(.)\]\s+(\S+)")


def _backend_pid(dsn: str, name: str) -> int:
    """The pid of the backend connected as application name, once it has connected."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            row = conn.execute(
                "SELECT pid FROM pg_catalog.pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            time.sleep(0.05)
    raise SystemExit("pgbench's backend never appeared in pg_stat_activity")


def profile_table(dsn: str, table: str, seconds: int, workdir: Path) -> tuple[int, collections.Counter[str]]:
    """Single-row UPDATEs to bench.<table> for seconds; the statements run while perf sampled their backend,
    and the samples per function (kernel samples summed as ``[kernel]``)."""
    script = workdir / f"{table}.sql"
    script.write_text(f"\\set id random(1, {ROWS})\nUPDATE bench.{table} SET v = v + 1 WHERE id = :id;\n")
    perf = find_tool("perf", "linux-perf")
    # A name of its own, so that the backend of the table before, maybe still exiting, is not the one sampled.
    name = f"capture-cpu-{table}-{time.monotonic_ns()}"
    bench = subprocess.Popen(
        [
            *(find_tool("pgbench"), "-n", "-M", "prepared", "-T", str(seconds + 2), "-f", str(script)),
            make_conninfo(dsn, application_name=name),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = _backend_pid(dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = _updates(conn, table)
        data = workdir / f"{table}.data"
        subprocess.run(
            [
                *(perf, "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY), "-p", str(pid)),
                *("-o", str(data), "--", "sleep", str(seconds)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        statements = _updates(conn, table) - before
    _, errors = bench.communicate()
    if bench.returncode != 0:
        raise SystemExit(f"pgbench failed: {errors.strip()}")
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "-n", "--sort", "dso,symbol"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        match = _REPORT_LINE.match(line)
        if match:
            count, space, symbol = match.groups()
            samples["[kernel]" if space == "k" else symbol] += int(count)
    return statements, samples


def _updates(conn: psycopg.Connection[tuple[int | None]], table: str) -> int:
    """UPDATEs run on bench.<table> so far: each adds 1 to one row's v, which starts at 0 (the statistics
    collector's counters would lag by up to a second)."""
    row = conn.execute(f"SELECT pg_catalog.sum(v) FROM bench.{table}").fetchone()
    assert row is not None
    return int(row[0] or 0)


def microseconds(samples: collections.Counter[str], statements: int) -> dict[str, float]:
    return {symbol: count * 1e6 / FREQUENCY / statements for symbol, count in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="sampling time per table and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with every table in a new order")
    parser.add_argument("--tables", default="none,empty,const,shipped", help="capture.py's tables to profile")
    parser.add_argument("--compare", default="const,shipped", help="two tables whose functions to set side by side")
    parser.add_argument("--top", type=int, default=25, help="functions to list for the pair")
    parser.add_argument("--durable", action="store_true", help="fsync and synchronous_commit on")
    args = parser.parse_args()
    tables = args.tables.split(",")
    unknown = [t for t in tables if t not in VARIANTS]
    if unknown:
        raise SystemExit(f"--tables: unknown {unknown}; capture.py has {list(VARIANTS)}")
    first, second = args.compare.split(",")
    per_round: dict[str, list[dict[str, float]]] = {table: [] for table in tables}
    with bench_database(None, durable=args.durable, logical=True) as dsn:
        setup(dsn)
        workdir = Path(tempfile.mkdtemp(prefix="matview-capture-cpu-"))
        for turn in range(args.rounds):
            for table in rotated(tables, turn):
                statements, samples = profile_table(dsn, table, args.seconds, workdir)
                per_round[table].append(microseconds(samples, statements))
                print(f"round {turn + 1}: {table} {statements} statements", flush=True)

    def median_of(table: str, pick: str | None = None) -> float:
        def value(profile: dict[str, float]) -> float:
            if pick is None:
                return sum(v for k, v in profile.items() if k != "[kernel]")
            return profile.get(pick, 0.0)

        return statistics.median(value(profile) for profile in per_round[table])

    base = median_of(tables[0])
    print(f"\nbackend CPU per single-row UPDATE, medians of {args.rounds} rounds (µs)")
    print(f"{'capture':10s} {'user space':>10s} {'over ' + tables[0]:>12s} {'kernel':>8s}")
    for table in tables:
        user = median_of(table)
        print(f"{table:10s} {user:10.2f} {user - base:+12.2f} {median_of(table, '[kernel]'):8.2f}")
    if first in per_round and second in per_round:
        symbols = {s for profile in per_round[first] + per_round[second] for s in profile} - {"[kernel]"}
        grown = sorted(symbols, key=lambda s: median_of(first, s) - median_of(second, s))
        print(f"\nfunctions that grew most from {first} to {second} (µs per statement)")
        for symbol in grown[: args.top]:
            a, b = median_of(first, symbol), median_of(second, symbol)
            print(f"{b - a:+7.3f} {a:7.3f} {b:7.3f} {symbol}")


if __name__ == "__main__":
    main()
