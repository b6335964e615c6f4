"""What a busy Python thread costs a refresh lane, per interpreter switch interval (issue #22).

A refresh runs in a worker thread and gives up the interpreter's lock at every round trip to the
database; when the answer arrives it must take the lock back. If another thread of the process is busy in
Python meanwhile (kopf handling watch events, a /metrics scrape formatting tens of thousands of series),
the worker waits until that thread is asked to let go, which CPython does after ``sys.getswitchinterval()``
(5 ms by default). A refresh makes about ten such returns, so in the operator a 15 ms refresh took 100 ms
and more while the process as a whole used well under one core.

Measured here in one run: a 100-row view refreshed (mode Concurrent) through ``Refresher.refresh``, as the
scheduler runs it, while the process is quiet and while one thread formats the /metrics of 1,000 views
in a loop, at each switch interval. Also what the interval costs the busy thread (scrapes a second).

    python benchmarks/gil_handoff.py [--dsn DSN] [--seconds 10]

Prints a table; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time

from _server import bench_database
from metrics_exposition import populated_metrics
from overhead import create_views
from prometheus_client import generate_latest

from matview.observe.metrics import RefreshMetrics
from matview.outcomes import Outcome
from matview.refresh.refresher import Refresher
from matview.refresh.settings import SWITCH_INTERVAL_SECONDS

PYTHON_DEFAULT_SECONDS = 0.005


class Busy:
    """A thread that formats a registry's exposition again and again until stopped (a scrape per loop)."""

    def __init__(self, views: int) -> None:
        self.metrics, _ = populated_metrics(views)
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            generate_latest(self.metrics.registry)
            self.scrapes += 1

    def __enter__(self) -> Busy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def refresh_times(refresher: Refresher, dsn: str, view: object, seconds: float) -> list[float]:
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        result = await refresher.refresh(dsn, view, "Concurrent")  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
        if result.result != Outcome.SUCCESS:
            raise SystemExit(f"{result.result}: {result.reason} {result.message}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="a database to use (default: a private server)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--views", type=int, default=1000, help="series the busy thread formats")
    args = parser.parse_args()
    intervals = sorted({PYTHON_DEFAULT_SECONDS, SWITCH_INTERVAL_SECONDS, 0.0005}, reverse=True)
    with bench_database(args.dsn) as dsn:
        (view,) = create_views(dsn, ["gil_handoff"], mode="Concurrent")
        refresher = Refresher(RefreshMetrics())
        rows = []
        try:
            asyncio.run(refresh_times(refresher, dsn, view, 1.0))  # warm: the pool, prepared statements
            for interval in intervals:
                sys.setswitchinterval(interval)
                quiet = asyncio.run(refresh_times(refresher, dsn, view, args.seconds))
                with Busy(args.views) as busy:
                    started = time.perf_counter()
                    loaded = asyncio.run(refresh_times(refresher, dsn, view, args.seconds))
                    scrapes_per_second = busy.scrapes / (time.perf_counter() - started)
                rows.append((interval, quiet, loaded, scrapes_per_second))
        finally:
            refresher.close()
    print(f"a refresh (Concurrent, 100 rows) while a thread formats /metrics of {args.views} views, {args.seconds:g} s")
    print("switch interval | quiet median ms | busy median ms | busy p90 ms | busy / quiet | scrapes/s | vs 5 ms")
    base_scrapes = next(r[3] for r in rows if r[0] == PYTHON_DEFAULT_SECONDS)
    for interval, quiet, loaded, scrapes in rows:
        q, b = statistics.median(quiet), statistics.median(loaded)
        p90 = statistics.quantiles(loaded, n=10)[-1]
        shipped = " (shipped)" if interval == SWITCH_INTERVAL_SECONDS else ""
        default = " (Python's default)" if interval == PYTHON_DEFAULT_SECONDS else ""
        print(
            f"{interval * 1000:g} ms{shipped}{default} | {q * 1000:.1f} | {b * 1000:.1f} | {p90 * 1000:.1f} | "
            f"{b / q:.2f} | {scrapes:.2f} | {scrapes / base_scrapes:.2f}"
        )


if __name__ == "__main__":
    main()
