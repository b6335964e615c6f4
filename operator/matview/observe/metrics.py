"""Prometheus metrics for refreshes, named by the Prometheus conventions.

``matview_`` prefix, base units, counters ending in ``_total``, labels of
bounded cardinality (namespace and name of the resource, plus mode, result,
reason or component from fixed sets). When a resource goes away, ``forget``
removes every series it had, so no stale series linger after a delete.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import threading
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from matview.api.spec import MaterializedView, RefreshMode
from matview.constants import DEFAULT_METRICS_PORT
from matview.errors import MatviewError
from matview.observe.memory import MemoryWatch
from matview.observe.series import Families
from matview.outcomes import NO_MODE, FailureReason, Outcome

# No ``_created`` sample beside every counter and histogram: Prometheus does not read them, and with a score of
# series per view they were a fifth of each scrape's lines and of the CPU it took (240,000 lines and 6 s of CPU
# at 3,000 views, benchmarks/metrics_exposition.py). Process-wide, as the library offers it.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client


class _Verification(Protocol):
    @property
    def inconclusive(self) -> str: ...
    @property
    def mismatched_rows(self) -> int: ...


class _PartitionWork(Protocol):
    @property
    def rebuilt(self) -> list[str]: ...
    @property
    def retired(self) -> list[str]: ...
    @property
    def scope(self) -> str: ...


class RecordedRefresh(Protocol):
    """What the metrics read of a refresh attempt (matview.refresh.RefreshResult has it): the metrics
    depend on the shape, not on the refresh engine."""

    @property
    def result(self) -> Outcome: ...
    @property
    def mode(self) -> str: ...
    @property
    def duration_seconds(self) -> float: ...
    @property
    def completed_at(self) -> dt.datetime: ...
    @property
    def failure_reason(self) -> FailureReason | None: ...
    @property
    def data_current(self) -> bool: ...
    @property
    def populated(self) -> bool | None: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def data_version(self) -> int | None: ...
    @property
    def table_bytes(self) -> int | None: ...
    @property
    def index_bytes(self) -> int | None: ...
    @property
    def staleness_seconds(self) -> float | None: ...
    @property
    def change_ratio(self) -> float | None: ...
    @property
    def keys_applied(self) -> int | None: ...
    @property
    def slot_retained_wal_bytes(self) -> int | None: ...
    @property
    def verification(self) -> _Verification | None: ...
    @property
    def partitions(self) -> _PartitionWork | None: ...


DEFAULT_PORT = DEFAULT_METRICS_PORT

#: From 0.1 s to 2 h: the client's default buckets stop at 10 s, far below a slow reporting view.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

#: Lateness and event-loop lag: from 10 ms to 5 min.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

MODES = tuple(mode.value for mode in RefreshMode.runnable())
RESULTS = (Outcome.SUCCESS, Outcome.FAILURE)


class RefreshMetrics:
    """All refresh metrics of one process, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["namespace", "name"]
        # Per view: plain numbers, collected at scrape time (see ``series``); ``forget`` removes them all.
        per_view = self._per_view = Families(self.registry)
        self.duration = per_view.add(
            "histogram",
            "matview_refresh_duration_seconds",
            "Duration of refreshes, by mode used, until the new data is live.",
            [*labels, "mode"],
            DURATION_BUCKETS,
        )
        self.refreshes = per_view.add(
            "counter",
            "matview_refreshes_total",
            "Refresh attempts, by mode used and result.",
            [*labels, "mode", "result"],
        )
        self.failures = per_view.add(
            "counter",
            "matview_refresh_failures_total",
            "Failed refreshes, by reason.",
            [*labels, "reason"],
        )
        self.last_success = per_view.add(
            "gauge",
            "matview_last_refresh_success_timestamp_seconds",
            "Unix time of the last successful refresh (0 = never).",
            labels,
        )
        self.last_duration = per_view.add(
            "gauge", "matview_last_refresh_duration_seconds", "Duration of the last refresh.", labels
        )
        self.interval = per_view.add(
            "gauge",
            "matview_refresh_interval_seconds",
            "Expected time between refreshes, from the spec (0 = on demand only).",
            labels,
        )
        self.timeout = per_view.add(
            "gauge",
            "matview_refresh_timeout_seconds",
            "The statement timeout of a refresh, from the spec (the slow-refresh alert compares with it).",
            labels,
        )
        self.in_progress = per_view.add(
            "gauge", "matview_refresh_in_progress", "1 while a refresh of the view runs.", labels
        )
        self.populated = per_view.add("gauge", "matview_populated", "1 when the materialized view holds data.", labels)
        self.data_version = per_view.add(
            "gauge",
            "matview_data_version",
            "The view's data version: bumped, with one NOTIFY, by every refresh that made new data live.",
            labels,
        )
        self.rows = per_view.add(
            "gauge",
            "matview_rows",
            "Rows in the materialized view (planner estimate, pg_class.reltuples).",
            labels,
        )
        self.size = per_view.add(
            "gauge",
            "matview_size_bytes",
            "On-disk size of the materialized view.",
            [*labels, "component"],
        )
        # Incremental views.
        self.staleness = per_view.add(
            "gauge",
            "matview_staleness_seconds",
            "Incremental views: age of the oldest change not yet applied (0 when none), as of the last look.",
            labels,
        )
        self.target_lag = per_view.add(
            "gauge",
            "matview_target_lag_seconds",
            "Incremental views: spec.refresh.targetLag (0 when none).",
            labels,
        )
        self.partitions_rebuilt = per_view.add(
            "counter",
            "matview_partitions_rebuilt_total",
            "Partitioned views: partitions rebuilt one at a time, by a full rebuild (scope all) or by one of only the "
            "partitions the changed keys touch (scope touched).",
            [*labels, "scope"],
        )
        self.partitions_remaining = per_view.add(
            "gauge",
            "matview_partitions_rebuild_remaining",
            "Partitioned views: partitions a running rebuild a partition at a time has still to swap in (0 when "
            "none runs).",
            labels,
        )
        self.partitions_retired = per_view.add(
            "counter",
            "matview_partitions_retired_total",
            "Partitioned views: partitions detached and dropped for leaving spec.partitioning.retain's window.",
            labels,
        )
        self.keys_applied = per_view.add(
            "counter",
            "matview_incremental_keys_applied_total",
            "Changed keys applied by incremental refreshes.",
            labels,
        )
        self.slot_retained_wal = per_view.add(
            "gauge",
            "matview_capture_slot_retained_wal_bytes",
            "LogicalDecoding views: WAL the view's replication slot keeps on the server's disk, as of the last look.",
            labels,
        )
        self.change_ratio = per_view.add(
            "gauge",
            "matview_incremental_change_ratio",
            "Pending changed keys as a share of the view's rows, when the last refresh decided its mode.",
            labels,
        )
        self.verify_mismatched_rows = per_view.add(
            "gauge",
            "matview_verify_mismatched_rows",
            "Rows that differed from a full recompute at the last verification (extra plus missing).",
            labels,
        )
        self.verify_mismatches = per_view.add(
            "counter",
            "matview_verify_mismatches_total",
            "Verifications that found stored rows differing from a full recompute.",
            labels,
        )
        # The process itself (no per-view labels): is the scheduler keeping up?
        self.scheduled = Gauge(
            "matview_scheduled_views", "Views with a scheduled refresh in this process.", registry=self.registry
        )
        self.running = Gauge("matview_refreshes_running", "Refreshes running now.", registry=self.registry)
        self.queue_depth = Gauge(
            "matview_refresh_queue_depth",
            "Refreshes due and started but waiting for a slot under their database's cap.",
            registry=self.registry,
        )
        self.demand = Gauge(
            "matview_refresh_demand_per_second",
            "Refreshes a second the schedules of this process's views ask for (the sum over its views of one over "
            "the expected period); above rate(matview_refreshes_total), its lanes cannot keep up.",
            registry=self.registry,
        )
        self.demand.set_function(self._demand_now)
        self.lanes = Gauge(
            "matview_refresh_lanes",
            "Refresh slots open now, summed over databases: each starts with a base and grows toward its ceiling "
            "(--max-concurrent) while due refreshes wait for a slot, and shrinks back when none wait.",
            registry=self.registry,
        )
        self.lanes_ceiling = Gauge(
            "matview_refresh_lanes_ceiling",
            "The most refresh slots the databases may open (--max-concurrent each), summed over databases.",
            registry=self.registry,
        )
        self._periods: dict[tuple[str, str], float] = {}
        self.start_lateness = Histogram(
            "matview_refresh_start_lateness_seconds",
            "How long after its due time a scheduled refresh was started.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "matview_event_loop_lag_seconds",
            "How late the operator's event loop ran a callback it had scheduled (a busy loop delays everything).",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self._memory_gauges(MemoryWatch())
        self._known: dict[tuple[str, str], tuple[bool, float, float, float]] = {}
        """Per view with series: the settings its gauges show (incremental, period, timeout, target lag)."""
        self._scheduler_shown: tuple[int, int, int, int, int] | None = None
        self._lock = threading.Lock()

    def track(
        self, view: MaterializedView, period_seconds: float | None, last_success_timestamp: float | None = None
    ) -> None:
        """Create a view's series (zeros) so rates and alerts work from its first refresh on. period_seconds:
        the expected time between refreshes (refresh.schedule.expected_period_seconds), which the staleness
        alert divides by."""
        namespace, name = view.namespace, view.resource_name
        key = (namespace, name)
        incremental = view.incremental is not None
        period, timeout, target_lag = (
            period_seconds or 0.0,
            view.refresh.timeout_seconds,
            view.refresh.target_lag_seconds,
        )
        shown = (incremental, period, timeout, target_lag or 0.0)
        with self._lock:
            first = key not in self._known
            # Called again after every refresh: the gauges and the demand sum (over all views) change only with
            # the view's settings, so they are set only then.
            changed = self._known.get(key) != shown
            self._known[key] = shown
            if changed:
                if period_seconds:
                    self._periods[key] = period_seconds
                else:
                    self._periods.pop(key, None)
        if first:
            for mode in MODES:
                for result in RESULTS:
                    self.refreshes.labels(namespace, name, mode, result)
            self.refreshes.labels(namespace, name, NO_MODE, Outcome.SKIPPED)
            for reason in FailureReason:
                self.failures.labels(namespace, name, reason)
            self.in_progress.labels(namespace, name).set(0)
            self.last_success.labels(namespace, name).set(last_success_timestamp or 0)
            if incremental:
                self.keys_applied.labels(namespace, name)
                self.verify_mismatches.labels(namespace, name)
        elif last_success_timestamp:
            self.last_success.raise_to(key, last_success_timestamp)
        if changed:
            self.interval.labels(namespace, name).set(period)
            self.timeout.labels(namespace, name).set(timeout)
            if incremental:
                self.target_lag.labels(namespace, name).set(target_lag or 0.0)

    def started(self, namespace: str, name: str) -> None:
        self.in_progress.set((namespace, name), 1)

    def finished(self, namespace: str, name: str) -> None:
        self.in_progress.set((namespace, name), 0)

    def rebuild_remaining(self, namespace: str, name: str, partitions: int) -> None:
        """A running rebuild a partition at a time has this many partitions still to swap in."""
        self.partitions_remaining.set((namespace, name), partitions)

    def record(self, namespace: str, name: str, result: RecordedRefresh) -> None:
        """Count one attempt and update the gauges from its outcome."""
        view = (namespace, name)
        self._record_incremental(view, result)
        self._record_partitions(view, result)
        if result.result == Outcome.SKIPPED:
            self.refreshes.inc((*view, NO_MODE, Outcome.SKIPPED))
            if result.data_current:  # verified unchanged: the data is as fresh as a refresh would make it
                self.last_success.set(view, result.completed_at.timestamp())
            return
        self.refreshes.inc((*view, result.mode, result.result))
        self.duration.observe((*view, result.mode), result.duration_seconds)
        self.last_duration.set(view, result.duration_seconds)
        if result.result == Outcome.SUCCESS:
            self.last_success.set(view, result.completed_at.timestamp())
        else:
            self.failures.inc((*view, result.failure_reason or FailureReason.OTHER))
        if result.populated is not None:
            self.populated.set(view, 1 if result.populated else 0)
        if result.rows is not None:
            self.rows.set(view, result.rows)
        if result.data_version is not None:
            self.data_version.set(view, result.data_version)
        if result.table_bytes is not None:
            self.size.set((*view, "table"), result.table_bytes)
        if result.index_bytes is not None:
            self.size.set((*view, "indexes"), result.index_bytes)

    def _record_partitions(self, view: tuple[str, str], result: RecordedRefresh) -> None:
        work = result.partitions
        if work is None or result.result == Outcome.FAILURE:
            return
        if work.rebuilt and result.result == Outcome.SUCCESS:
            self.partitions_rebuilt.inc((*view, work.scope), len(work.rebuilt))
        if work.retired:  # a skipped refresh retires too
            self.partitions_retired.inc(view, len(work.retired))

    def _record_incremental(self, view: tuple[str, str], result: RecordedRefresh) -> None:
        if result.staleness_seconds is not None:
            self.staleness.set(view, result.staleness_seconds)
        if result.change_ratio is not None:
            self.change_ratio.set(view, result.change_ratio)
        if result.slot_retained_wal_bytes is not None:
            self.slot_retained_wal.set(view, result.slot_retained_wal_bytes)
        if result.keys_applied and result.result == Outcome.SUCCESS:
            self.keys_applied.inc(view, result.keys_applied)
        verification = result.verification
        if verification is not None and not verification.inconclusive:
            self.verify_mismatched_rows.set(view, verification.mismatched_rows)
            if verification.mismatched_rows:
                self.verify_mismatches.inc(view)

    def _demand_now(self) -> float:
        """The demand gauge's value, summed when a scrape reads it: kept up to date on every change instead, it
        was a sum over all views per view put (at 10,000 views, 50 million terms as they were first seen). Summed
        again, not kept as a running total, so floating-point error never accumulates over thousands of edits."""
        with self._lock:
            return math.fsum(1 / period for period in self._periods.values())

    def scheduler(self, scheduled: int, running: int, waiting: int, lanes: tuple[int, int] = (0, 0)) -> None:
        """The scheduler's gauges, set when one changed (the loop reports after every wake-up)."""
        shown = (scheduled, running, waiting, *lanes)
        if shown == self._scheduler_shown:
            return
        self._scheduler_shown = shown
        self.scheduled.set(scheduled)
        self.running.set(running)
        self.queue_depth.set(waiting)
        self.lanes.set(lanes[0])
        self.lanes_ceiling.set(lanes[1])

    def lateness(self, seconds: float) -> None:
        self.start_lateness.observe(seconds)

    async def watch_event_loop(self, period_seconds: float = 0.5) -> None:
        """Measure event-loop lag until cancelled: how much later than asked a short sleep returns."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + period_seconds
            await asyncio.sleep(period_seconds)
            self.loop_lag.observe(max(0.0, loop.time() - asked))

    def _memory_gauges(self, memory: MemoryWatch) -> None:
        """The process's memory as its container's OOM killer sees it, read at each scrape; the limit and the
        headroom exist only where a limit does (the MatviewOperatorNearMemoryLimit alert compares them)."""
        working_set = Gauge(
            "matview_memory_working_set_bytes",
            "Memory of this process's container that the kernel cannot reclaim (usage less inactive file cache, "
            "as the kubelet counts it); the process's resident set where no memory limit applies.",
            registry=self.registry,
        )
        working_set.set_function(lambda: float(memory.working_set_bytes() or math.nan))
        limit = memory.limit_bytes()
        if limit is None:
            return
        Gauge(
            "matview_memory_limit_bytes",
            "The memory limit of this process's container (cgroup); past it the process is killed.",
            registry=self.registry,
        ).set_function(lambda: float(memory.limit_bytes() or math.nan))

        def headroom() -> float:
            now_limit, used = memory.limit_bytes(), memory.working_set_bytes()
            return math.nan if now_limit is None or used is None else float(now_limit - used)

        Gauge(
            "matview_memory_headroom_bytes",
            "The memory limit less the working set: what this process may still grow before it is killed.",
            registry=self.registry,
        ).set_function(headroom)

    def forget(self, namespace: str, name: str) -> None:
        """Remove every series of a deleted resource."""
        with self._lock:
            self._known.pop((namespace, name), None)
            self._periods.pop((namespace, name), None)
        for family in self._per_view.families:
            family.remove_by_labels({"namespace": namespace, "name": name})

    def serve(self, port: int = DEFAULT_PORT, address: str = "0.0.0.0") -> None:  # noqa: S104 - scraped in-cluster
        """Serve /metrics over HTTP in a background thread; a port that cannot be had is an error naming it."""
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise MatviewError(
                f"cannot serve /metrics on {address}:{port}: {exc.strerror or exc}; "
                "choose another --metrics-port (0 turns it off)"
            ) from None
