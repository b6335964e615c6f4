"""What one Prometheus scrape of a process's /metrics costs, per view count (issues #22 and #24).

The process serves its series from a thread that holds the interpreter's lock while it formats them, so a
scrape's CPU is also a pause for the scheduler and the refresh lanes. Each view is tracked and has refreshed
in two modes (Concurrent and Swap, as Auto does), which is what a long-running operator shows. The same
registry is formatted with the library's default ``_created`` samples and as shipped (without them), in one
run, so the ratio is measured on the same machine at the same moment.

    python benchmarks/metrics_exposition.py [--views 1000 3000] [--repeat 3]

Prints a table; no assertions (these machines are noisy): read the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

import prometheus_client
from prometheus_client import generate_latest

from matview.api.validation import validate_document
from matview.observe.metrics import RefreshMetrics
from matview.outcomes import Outcome
from matview.refresh.attempt import RefreshResult


def populated_metrics(views: int) -> RefreshMetrics:
    metrics = RefreshMetrics()
    now = dt.datetime.now(dt.UTC)
    for i in range(views):
        view = validate_document(
            {
                "apiVersion": "matview.dev/v1alpha1",
                "kind": "MaterializedView",
                "metadata": {"name": f"view-{i}", "namespace": "bench"},
                "spec": {"schema": "bench", "name": f"view_{i}", "query": "SELECT 1 AS one"},
            }
        )
        metrics.track(view, 60)
        for mode in ("Concurrent", "Swap"):
            result = RefreshResult(
                view.relation, mode, Outcome.SUCCESS, "bench", now, now, 0.02,
                populated=True, rows=100, table_bytes=8192, index_bytes=16384, data_version=2,
            )  # fmt: skip
            metrics.record(view.namespace, view.resource_name, result)
    return metrics


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
    print("views | exposition | lines | MB | CPU s per scrape | CPU ratio to the library default")
    for views in args.views:
        metrics = populated_metrics(views)
        prometheus_client.enable_created_metrics()
        default = scrape_cost(metrics, args.repeat)
        prometheus_client.disable_created_metrics()  # as matview.observe.metrics ships it
        shipped = scrape_cost(metrics, args.repeat)
        for label, (lines, size, cpu) in (("library default (_created)", default), ("shipped", shipped)):
            print(f"{views} | {label} | {lines} | {size / 1e6:.1f} | {cpu:.2f} | {cpu / default[2]:.2f}")


if __name__ == "__main__":
    main()
