"""What the machinery costs around PostgreSQL's own work (issue #22), in one run, side by side.

1. Latency: a 100-row view refreshed by a bare ``REFRESH … CONCURRENTLY`` on one warm connection, against
   the engine's refresh (Concurrent, Swap, Full, Auto) on the refresh lane's own warm pool, the way the
   scheduler runs it (``Refresher.refresh``: a worker thread, the pool's checkout and reset, metrics); the
   five take turns, 10 refreshes at a time.
   Target: the engine within 2 times the bare statement, or within 5 ms of it, whichever is larger.
2. Where the time goes: each refresh step timed (exclusive of the steps it calls) and the statements
   it sends counted (BEGIN and COMMIT included; pipelined statements share a round trip), per mode. The
   refresh transaction holds the statement and what ends it: the version bump, the marker with the new state,
   the lock's release and the sizes read. The inspection's read goes with the lock's take. Then the CPU one
   refresh costs, in this process and in the server's backend (read from /proc: a private server, or one on
   this machine): on this 2-core machine throughput is bounded by their sum, not by latency.
3. Throughput: --views views of 100 rows, each due every second (the shortest interval), under ``matview run
   --max-concurrent 2`` (a real
   process, counted from its /metrics) against two bare connections refreshing the same views round-robin.
   Target: at least half the bare rate. Between them, the engine's refresh called by two plain threads (no
   scheduler, event loop, pool or metrics), which splits the gap into the engine's part and the runner's.
   The three take turns in --rounds rounds (matview run started again in each), so that this shared
   machine's slow and fast spells fall on all three alike; one after the other, the ratio moved from x0.42 to
   x0.59 between sittings.

    python benchmarks/overhead.py [--dsn DSN] [--durable] [--repeat 200] [--views 400] [--seconds 40] [--rounds 4]

Prints tables; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import yaml
from _server import bench_database
from psycopg_pool import ConnectionPool

from matview.api.spec import MaterializedView
from matview.api.validation import validate_document
from matview.embedded.localpg import free_port
from matview.observe.metrics import RefreshMetrics
from matview.outcomes import Outcome
from matview.plan import engine, session
from matview.refresh import attempt, facts, policy
from matview.refresh.refresher import Refresher
from matview.refresh.settings import SWITCH_INTERVAL_SECONDS, RunnerSettings

ROOT = Path(__file__).resolve().parents[1]
MODES = ("Concurrent", "Swap", "Full", "Auto")


def document(name: str, interval: str = "1h", mode: str = "Auto") -> dict[str, Any]:
    return {
        "apiVersion": "matview.dev/v1alpha1",
        "kind": "MaterializedView",
        "metadata": {"name": name.replace("_", "-"), "namespace": "bench"},
        "spec": {
            "schema": "bench",
            "name": name,
            "query": f"SELECT id, v FROM bench.{name}_src",
            "indexes": [{"columns": ["id"], "unique": True}],
            "refresh": {"interval": interval, "mode": mode},
        },
    }


def create_views(dsn: str, names: list[str], interval: str = "1h", mode: str = "Auto") -> list[MaterializedView]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        for name in names:
            conn.execute(f"DROP TABLE IF EXISTS bench.{name}_src CASCADE")
            conn.execute(f"CREATE TABLE bench.{name}_src AS SELECT g AS id, g * 2 AS v FROM generate_series(1, 100) g")
    views = [validate_document(document(name, interval, mode)) for name in names]
    with engine.connect(dsn) as conn:
        for view in views:
            attempt.apply_and_record(conn, view)
    return views


def bare_refresh(relation: str) -> str:
    """The bare statement every comparison measures the engine against."""
    return f"REFRESH MATERIALIZED VIEW CONCURRENTLY {relation}"


# --- 1. latency ------------------------------------------------------------------------------------------


async def interleaved_latencies(
    refresher: Refresher, dsn: str, view: MaterializedView, repeat: int, chunk: int = 10
) -> dict[str | None, list[float]]:
    """Seconds of each refresh: the bare statement (key None) on one warm connection, and each mode of the engine
    on the refresh lane's warm pool, taking turns chunk refreshes at a time. One after the other, this shared
    machine's slow spells fell on whichever ran then: bare REFRESH measured 2.4 ms in one minute and 6 ms a
    few minutes later, which made the ratios meaningless."""
    statement = bare_refresh(view.relation)
    times: dict[str | None, list[float]] = {None: [], **{mode: [] for mode in MODES}}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)  # warm
        for mode in MODES:
            for _ in range(3):  # warm: the pool's connection, prepared statements, Auto's evidence
                await refresher.refresh(dsn, view, mode)
        while len(times[None]) < repeat:
            for _ in range(chunk):
                start = time.perf_counter()
                conn.execute(statement)
                times[None].append(time.perf_counter() - start)
            for mode in MODES:
                for _ in range(chunk):
                    start = time.perf_counter()
                    result = await refresher.refresh(dsn, view, mode)
                    times[mode].append(time.perf_counter() - start)
                    if result.result != Outcome.SUCCESS:
                        raise SystemExit(f"{mode}: {result.result}: {result.reason} {result.message}")
    return times


# --- 2. where the time goes --------------------------------------------------------------------------------


class Profile:
    """Exclusive time per step (a step's time less the steps it called) and statements sent per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.statements: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [step, start, children's seconds]

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        frame: list[Any] = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.seconds[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def sent(self) -> None:
        self.statements[self._stack[-1][0] if self._stack else "outside the steps"] += 1


def instrument(profile: Profile) -> Callable[[], None]:
    """Time the refresh's steps where the engine calls them; returns the undo."""
    undo: list[Callable[[], None]] = []

    def wrap(module: Any, name: str, step: str) -> None:
        original = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with profile.step(step):
                return original(*args, **kwargs)

        setattr(module, name, timed)
        undo.append(lambda: setattr(module, name, original))

    def wrap_context(module: Any, name: str, step: str) -> None:
        original = getattr(module, name)

        @contextlib.contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            manager = original(*args, **kwargs)
            with profile.step(step):
                value = manager.__enter__()
            try:
                yield value
            finally:
                with profile.step(step + " (release)"):
                    manager.__exit__(None, None, None)

        setattr(module, name, timed)
        undo.append(lambda: setattr(module, name, original))

    wrap_context(attempt, "view_lock", "lock and inspection read")
    wrap(facts, "inspected", "inspection (the rest)")
    wrap(policy, "decide", "plan")
    wrap(attempt, "_run", "refresh transaction")
    wrap(session, "step_settings", "session settings")
    wrap(session, "restore", "session settings")
    wrap(session, "configure", "session settings")
    wrap(attempt, "_record", "marker write")
    wrap(attempt, "view_size", "sizes")
    wrap(session, "reset", "session reset")

    def undo_all() -> None:
        for restore in reversed(undo):
            restore()

    return undo_all


class CountingConnection(psycopg.Connection[Any]):
    """A connection that tells the profile about every statement it sends (BEGIN and COMMIT counted as statements)."""

    profile: Profile | None = None

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if CountingConnection.profile is not None:
            CountingConnection.profile.sent()
        return super().execute(*args, **kwargs)

    @contextlib.contextmanager
    def transaction(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """BEGIN and COMMIT (or ROLLBACK) are a statement each."""
        if CountingConnection.profile is not None:
            CountingConnection.profile.sent()
        try:
            with super().transaction(*args, **kwargs) as tx:
                yield tx
        finally:
            if CountingConnection.profile is not None:
                CountingConnection.profile.sent()


def lane_pool(
    dsn: str, connection_class: type[psycopg.Connection[Any]] = psycopg.Connection
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool of one connection, opened and configured as the refresh lane's pool does it (take its connections
    with ``lane_connection``, which resets them as the lane's thread does)."""
    return ConnectionPool(
        dsn,
        min_size=1,
        max_size=1,
        connection_class=connection_class,
        kwargs=session.connection_kwargs(),  # as the refresh lane's pool: statements prepared on fifth use
        configure=session.configure,
    )


@contextlib.contextmanager
def lane_connection(pool: ConnectionPool[Any]) -> Iterator[Any]:
    """A connection of pool, cleaned before it goes back as the refresh lane's thread does it."""
    with pool.connection() as conn:
        try:
            yield conn
        finally:
            session.clean_for_return(conn)


def breakdown(dsn: str, view: MaterializedView, mode: str, repeat: int) -> tuple[Profile, float]:
    """The refresh's steps on a warm pooled connection, as the refresh lane runs it (checkout, refresh,
    reset); returns the profile (totals over repeat) and the median wall time."""
    profile = Profile()
    undo = instrument(profile)  # first: the pool's configure and reset are the instrumented ones
    pool = lane_pool(dsn, CountingConnection)
    walls = []
    try:
        with lane_connection(pool) as conn:
            attempt.refresh(conn, view, mode)
        CountingConnection.profile = profile
        for _ in range(repeat):
            start = time.perf_counter()
            with profile.step("pool checkout and return"), lane_connection(pool) as conn:
                result = attempt.refresh(conn, view, mode)
            walls.append(time.perf_counter() - start)
            assert result.result == Outcome.SUCCESS, result
    finally:
        CountingConnection.profile = None
        undo()
        pool.close()
    return profile, statistics.median(walls)


def backend_cpu_seconds(pid: int) -> float | None:
    """CPU the server process pid has used so far (None when it is not on this machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_refresh(dsn: str, view: MaterializedView, mode: str | None, repeat: int) -> tuple[float, float | None]:
    """(this process, the server's backend) CPU seconds per refresh: mode None is the bare statement on one
    connection; a mode is the engine's refresh on the lane's warm pool of one connection, reset included."""
    if mode is None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            statement = bare_refresh(view.relation)
            conn.execute(statement)
            client, server = time.process_time(), backend_cpu_seconds(conn.info.backend_pid)
            for _ in range(repeat):
                conn.execute(statement)
            after = backend_cpu_seconds(conn.info.backend_pid)
            spent = time.process_time() - client
    else:
        pool = lane_pool(dsn)
        try:
            for _ in range(10):  # warm: prepared statements, Auto's evidence
                with lane_connection(pool) as conn:
                    attempt.refresh(conn, view, mode)
                    pid = conn.info.backend_pid
            client, server = time.process_time(), backend_cpu_seconds(pid)
            for _ in range(repeat):
                with lane_connection(pool) as conn:
                    attempt.refresh(conn, view, mode)
            spent = time.process_time() - client
            with lane_connection(pool) as conn:
                same = conn.info.backend_pid == pid
            after = backend_cpu_seconds(pid) if same else None
        finally:
            pool.close()
    backend = after - server if after is not None and server is not None else None
    return spent / repeat, backend / repeat if backend is not None else None


# --- 3. throughput -----------------------------------------------------------------------------------------


def threads_throughput(
    connect: Callable[[], Any], work: Callable[[Any, int], object], seconds: float, lanes: int = 2
) -> float:
    """Refreshes a second of lanes threads, each on its own connection, calling work(conn, position) in turn."""
    done = [0] * lanes
    stop = threading.Event()

    def lane(index: int) -> None:
        with connect() as conn:
            position = index
            while not stop.is_set():
                work(conn, position)
                done[index] += 1
                position += lanes

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def bare_throughput(dsn: str, relations: list[str], seconds: float, lanes: int = 2) -> float:
    def work(conn: Any, position: int) -> None:
        conn.execute(bare_refresh(relations[position % len(relations)]))

    return threads_throughput(lambda: psycopg.connect(dsn, autocommit=True), work, seconds, lanes)


def engine_throughput(dsn: str, views: list[MaterializedView], seconds: float, lanes: int = 2) -> float:
    """The engine's refresh called by plain threads: no scheduler, event loop, pool or metrics (what the runner's
    own machinery costs is the difference to matview run)."""

    def work(conn: Any, position: int) -> None:
        result = attempt.refresh(conn, views[position % len(views)], "Concurrent")
        if result.result != Outcome.SUCCESS:
            raise SystemExit(f"engine: {result.result}: {result.reason} {result.message}")

    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)  # as matview run sets it
    return threads_throughput(lambda: engine.connect(dsn), work, seconds, lanes)


def refreshes_so_far(url: str) -> float:
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():  # noqa: S310 - localhost
        if line.startswith("matview_refreshes_total{") and 'result="success"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def running_runner(dsn: str, names: list[str], lanes: int = 2) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`matview run` on names (every view due every second), in steady state: every view refreshed at least
    once. Yields the process and its /metrics address."""
    folder = Path(tempfile.mkdtemp(prefix="matview-overhead-"))
    (folder / "views.yaml").write_text(
        yaml.safe_dump_all([document(name, interval="1s", mode="Concurrent") for name in names])
    )
    port = free_port()
    dsn_file = folder / "dsn"
    dsn_file.write_text(dsn)
    dsn_file.chmod(0o600)  # matview run refuses a DSN file others may read
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "matview.cli",
            "run",
            "--dsn-file",
            str(dsn_file),
            "--metrics-port",
            str(port),
            "--max-concurrent",
            str(lanes),
            "--control-socket",
            str(folder / "run.sock"),
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "runner.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if refreshes_so_far(url) >= 2 * len(names):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                log = (folder / "runner.log").read_text()[-2000:]
                raise SystemExit(f"matview run did not reach steady state:\n{log}")
            time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def runner_rate(url: str, seconds: float) -> float:
    """Refreshes a second `matview run` completes over the next seconds (counted from its /metrics)."""
    before, start = refreshes_so_far(url), time.monotonic()
    time.sleep(seconds)
    return (refreshes_so_far(url) - before) / (time.monotonic() - start)


def interleaved_throughput(
    dsn: str, views: list[MaterializedView], names: list[str], seconds: float, rounds: int
) -> tuple[list[tuple[float, float, float]], float]:
    """(bare, plain threads, matview run) refreshes a second in each round, and matview run's reported median
    duration (its last round). The three take turns within each round, so that the shared machine's slow and
    fast spells fall on all of them alike. matview run starts again in each round and is counted from its steady
    state: paused (SIGSTOP) instead, it could stop inside a refresh's transaction and hold that view's lock
    while the bare connections wait for it."""
    relations = [f"{view.schema}.{view.name}" for view in views]
    found = []
    median = 0.0
    for _ in range(rounds):
        bare = bare_throughput(dsn, relations, seconds)
        threads = engine_throughput(dsn, views, seconds)
        with running_runner(dsn, names) as (_, url):
            found.append((bare, threads, runner_rate(url, seconds)))
            median = reported_median(url)
    return found, median


def reported_median(url: str) -> float:
    """The median of matview_refresh_duration_seconds over all views, from its buckets."""
    buckets: dict[float, float] = defaultdict(float)
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():  # noqa: S310 - localhost
        if line.startswith("matview_refresh_duration_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] += float(line.rsplit(" ", 1)[1])
    bounds = sorted(buckets)
    half = buckets[bounds[-1]] / 2
    return next(bound for bound in bounds if buckets[bound] >= half)


# --- the report --------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a database to use (default: a private server)")
    parser.add_argument("--repeat", type=int, default=200)
    # An interval is at least 1 s, so N views ask for at most N refreshes a second: 100 views capped matview run
    # at 100/s (the "84.7 a second" was that cap, not the lanes). 400 keep two lanes always busy.
    parser.add_argument("--views", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=40, help="throughput: seconds for each of the three, in all")
    parser.add_argument("--rounds", type=int, default=4, help="throughput: turns the three take")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="the private server with fsync and synchronous_commit on, as in production",
    )
    args = parser.parse_args()
    with bench_database(args.dsn, durable=args.durable) as dsn:
        (view,) = create_views(dsn, ["single"])
        refresher = Refresher(RefreshMetrics(), RunnerSettings())
        try:
            latencies = asyncio.run(interleaved_latencies(refresher, dsn, view, args.repeat))
        finally:
            refresher.close()
        bare = statistics.median(latencies[None])
        print(f"1. latency of one 100-row view, median of {args.repeat}, taking turns 10 at a time (ms)")
        print("refresh | median | ratio to bare | over bare (ms) | target met")
        print(f"bare REFRESH CONCURRENTLY | {ms(bare)} | 1.00 | 0.0 | -")
        for mode in MODES:
            median = statistics.median(latencies[mode])
            verdict = "yes" if median <= max(2 * bare, bare + 0.005) else "NO"
            print(f"engine {mode} | {ms(median)} | {median / bare:.2f} | {ms(median - bare)} | {verdict}")
        print()
        print(f"2. where the time goes: ms per refresh (exclusive), statements per refresh; {args.repeat} each")
        profiles = {mode: breakdown(dsn, view, mode, args.repeat) for mode in MODES}
        steps = sorted({step for profile, _ in profiles.values() for step in profile.seconds})
        print("step | " + " | ".join(f"{mode} ms | {mode} statements" for mode in MODES))
        for step in steps:
            cells = []
            for mode in MODES:
                profile, _ = profiles[mode]
                sent = profile.statements[step] / args.repeat
                cells.append(f"{ms(profile.seconds[step] / args.repeat)} | {sent:.1f}")
            print(f"{step} | " + " | ".join(cells))
        totals = []
        for mode in MODES:
            profile, wall = profiles[mode]
            totals.append(f"{ms(wall)} | {sum(profile.statements.values()) / args.repeat:.1f}")
        print("median wall, all statements | " + " | ".join(totals))
        print()
        print(f"CPU per refresh (ms), {args.repeat * 3} each: this process | the server's backend | both")
        for measured in (None, *MODES):
            client, server = cpu_per_refresh(dsn, view, measured, args.repeat * 3)
            both = ms(client + server) if server is not None else "?"
            name = f"engine {measured}" if measured else "bare REFRESH CONCURRENTLY"
            print(f"{name} | {ms(client)} | {ms(server) if server is not None else '? (not on this machine)'} | {both}")

        if args.skip_throughput:
            return
        print()
        names = [f"v{i:03d}" for i in range(args.views)]
        views = create_views(dsn, names)
        rounds, median = interleaved_throughput(dsn, views, names, args.seconds / args.rounds, args.rounds)
        print(
            f"3. throughput, {args.views} views of 100 rows due every second, 2 lanes, "
            f"{args.rounds} rounds of {args.seconds / args.rounds:.0f} s each, taking turns"
        )
        print("round | 2 bare connections | the engine in 2 plain threads | matview run --max-concurrent 2 | run/bare")
        for number, (bare, threads, run) in enumerate(rounds, start=1):
            print(f"{number} | {bare:.1f} | {threads:.1f} ({threads / bare:.2f}) | {run:.1f} | {run / bare:.2f}")
        bare_rate = statistics.fmean(bare for bare, _, _ in rounds)
        engine_rate = statistics.fmean(threads for _, threads, _ in rounds)
        rate = statistics.fmean(run for _, _, run in rounds)
        print()
        print("who | refreshes/s (mean of rounds) | ratio to bare | median duration")
        print(f"2 bare connections | {bare_rate:.1f} | 1.00 | -")
        print(f"the engine in 2 plain threads | {engine_rate:.1f} | {engine_rate / bare_rate:.2f} | -")
        print(f"matview run --max-concurrent 2 | {rate:.1f} | {rate / bare_rate:.2f} | ≤ {ms(median)} ms (bucket)")
        ratios = sorted(run / bare for bare, _, run in rounds)
        middle = statistics.median(ratios)
        print(f"matview run / bare per round: median {middle:.2f}, from {ratios[0]:.2f} to {ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
