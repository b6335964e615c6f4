"""What the per-view series cost: memory held, and the CPU of one Prometheus scrape, per view count (issues
#22 and #24).

The process serves its series from a thread that holds the interpreter's lock while it formats them, so a
scrape's CPU is also a pause for the scheduler and the refresh lanes; and every view's series stay in memory.
Each view is tracked and has refreshed in two modes (Concurrent and Swap, as Auto does), which is what a
long-running operator shows. The same updates go to the series as shipped (``matview.observe.series``: plain
numbers, collected at scrape time) and, as the baseline of the same run, to prometheus_client's own labelled
metrics (an object, and a lock per number, for every series), which the operator used before.

    python benchmarks/metrics_exposition.py [--views 1000 3000] [--repeat 3]

Prints a table; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any
from unittest import mock

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from matview.api.validation import validate_document
from matview.observe import metrics as metrics_module
from matview.observe.metrics import RefreshMetrics
from matview.outcomes import Outcome
from matview.refresh.attempt import RefreshResult


class LibraryFamilies:
    """The baseline: each family a prometheus_client metric of the same name, labels and buckets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def add(self, kind: str, name: str, documentation: str, labelnames: Sequence[str], buckets: Any = ()) -> Any:
        if kind == "histogram":
            return Histogram(name, documentation, labelnames, buckets=buckets, registry=self.registry)
        return (Counter if kind == "counter" else Gauge)(name, documentation, labelnames, registry=self.registry)


def populated_metrics(views: int) -> tuple[RefreshMetrics, int]:
    """The metrics of views tracked and refreshed twice, and the bytes they hold."""
    documents = [
        validate_document(
            {
                "apiVersion": "matview.dev/v1alpha1",
                "kind": "MaterializedView",
                "metadata": {"name": f"view-{i}", "namespace": "bench"},
                "spec": {"schema": "bench", "name": f"view_{i}", "query": "SELECT 1 AS one"},
            }
        )
        for i in range(views)
    ]
    now = dt.datetime.now(dt.UTC)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    metrics = RefreshMetrics()
    for view in documents:
        metrics.track(view, 60)
        for mode in ("Concurrent", "Swap"):
            result = RefreshResult(
                view.relation, mode, Outcome.SUCCESS, "bench", now, now, 0.02,
                populated=True, rows=100, table_bytes=8192, index_bytes=16384, data_version=2,
            )  # fmt: skip
            metrics.record(view.namespace, view.resource_name, result)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return metrics, held


def scrape_cost(metrics: RefreshMetrics, repeat: int) -> tuple[int, int, float]:
    """Lines and bytes of one scrape, and the median CPU seconds it took."""
    seconds = []
    for _ in range(repeat):
        start = time.process_time()
        body = generate_latest(metrics.registry)
        seconds.append(time.process_time() - start)
    return body.count(b"\n"), len(body), statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("views | series kept by | KiB per view | lines | MB | CPU s per scrape | memory ratio | CPU ratio")
    for views in args.views:
        with mock.patch.object(metrics_module, "Families", LibraryFamilies):
            library, library_bytes = populated_metrics(views)
        library_cost = scrape_cost(library, args.repeat)
        del library
        shipped, shipped_bytes = populated_metrics(views)
        shipped_cost = scrape_cost(shipped, args.repeat)
        for label, held, (lines, size, cpu) in (
            ("prometheus_client (before)", library_bytes, library_cost),
            ("matview.observe.series (shipped)", shipped_bytes, shipped_cost),
        ):
            print(
                f"{views} | {label} | {held / 1024 / views:.1f} | {lines} | {size / 1e6:.1f} | {cpu:.2f} | "
                f"{held / library_bytes:.2f} | {cpu / library_cost[2]:.2f}"
            )


if __name__ == "__main__":
    main()
