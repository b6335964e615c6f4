"""Run refreshes from asyncio: worker threads, a per-database cap, clean cancellation.

``Refresher`` is what the one scheduler calls for both feeders (``matview run`` and the
Kubernetes operator): it offloads the synchronous engine to a thread, holds
at most ``max_concurrent_per_database`` refreshes per database (so fifty views
due at the same minute do not flatten it; it starts with fewer slots and grows
toward that ceiling while refreshes wait, see ``slots``), shares one connection pool per
database, cancels the server-side statement when its task is cancelled (on
shutdown), and records every result in the metrics.

Refreshes, applies (creates, edits, deletes) and drift checks run in separate lanes: their own threads,
their own connection pools and their own per-database caps, so a burst of thousands of reconciles never
delays a due refresh, a creation never waits behind drift checks, and work waits for its turn in its lane
rather than timing out on a pool. A lane's thread whose work ends takes the next waiting work itself
(``slots``): the event loop only hands work in and takes results out, off the lanes' path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from psycopg_pool import ConnectionPool

from matview.api.spec import MaterializedView
from matview.constants import APPLICATION_NAME
from matview.observe.metrics import RefreshMetrics
from matview.outcomes import NO_MODE, Outcome
from matview.plan import session
from matview.plan.observed import Connection
from matview.plan.partitions import RebuildProgress
from matview.refresh import RefreshResult, classify, facts, refresh
from matview.refresh.feeding import Relation
from matview.refresh.settings import LANES, Lane, RunnerSettings
from matview.refresh.slots import Slots

logger = logging.getLogger(__name__)


class Refresher:
    """Refreshes views from asyncio, with a per-database cap, pooled connections and metrics."""

    def __init__(self, metrics: RefreshMetrics, settings: RunnerSettings | None = None) -> None:
        self.metrics = metrics
        self.settings = settings or RunnerSettings()
        self._pools: dict[tuple[str, Lane], ConnectionPool[Connection]] = {}
        self._caps: dict[tuple[str, Lane], Slots] = {}
        self._pools_lock = threading.Lock()
        #: The work a lane's thread runs now, with its cancellation flag (``run_sync``).
        self._running = threading.local()
        self._executors: dict[Lane, ThreadPoolExecutor] = {
            "refresh": ThreadPoolExecutor(self.settings.refresh_threads, thread_name_prefix="matview-refresh"),
            "apply": ThreadPoolExecutor(self.settings.apply_threads, thread_name_prefix="matview-apply"),
            "check": ThreadPoolExecutor(self.settings.max_concurrent_drift_checks, thread_name_prefix="matview-check"),
        }

    def _limit(self, lane: Lane) -> int:
        """Work of lane that may run at once against one database."""
        if lane == "refresh":
            return self.settings.max_concurrent_per_database
        if lane == "check":
            return self.settings.max_concurrent_checks_per_database
        return self.settings.max_concurrent_applies_per_database

    def _cap(self, dsn: str, lane: Lane) -> Slots:
        cap = self._caps.get((dsn, lane))
        if cap is None:
            ceiling = self._limit(lane)
            floor = min(self.settings.base_concurrent_per_database, ceiling) if lane == "refresh" else ceiling
            cap = self._caps[(dsn, lane)] = Slots(
                floor,
                ceiling,
                self.settings.lane_grow_after_seconds,
                self.settings.lane_shrink_after_seconds,
                self._executors[lane],
            )
        return cap

    def waiting(self) -> int:
        """Refreshes waiting for a slot under their database's cap (the queue depth)."""
        return sum(cap.waiting() for (_, lane), cap in self._caps.items() if lane == "refresh")

    def refresh_lanes(self) -> tuple[int, int]:
        """Refresh slots open now and their ceiling, summed over the databases."""
        caps = [cap for (_, lane), cap in self._caps.items() if lane == "refresh"]
        return sum(cap.limit for cap in caps), sum(cap.ceiling for cap in caps)

    def pool(self, dsn: str, lane: Lane = "refresh") -> ConnectionPool[Connection]:
        """The shared pool of one database and lane (created on first use, by one thread only)."""
        with self._pools_lock:
            return self._pool_locked(dsn, lane)

    def _pool_locked(self, dsn: str, lane: Lane) -> ConnectionPool[Connection]:
        if (dsn, lane) not in self._pools:
            self._pools[(dsn, lane)] = ConnectionPool(
                dsn,
                min_size=0,
                # One per slot, one per slot's drain aside (refresh lane), and one spare.
                max_size=self._limit(lane) * (2 if lane == "refresh" else 1) + 1,
                open=True,
                # psycopg prepares a statement on its fifth use: the catalog reads every refresh makes are then
                # planned once per connection, not once per refresh (planning was most of their cost).
                # session.reset keeps them, and discards them when a query tampered with them. The lane's thread
                # resets a connection before returning it (session.clean_for_return), not the pool.
                kwargs=session.connection_kwargs(),
                # Fail fast when the database is down (callers retry and report it), and keep reconnecting
                # in the background only about as long as a retry would wait anyway.
                timeout=10,
                reconnect_timeout=60,
                name=f"{APPLICATION_NAME}-{lane}",
                configure=session.configure,
            )
        return self._pools[(dsn, lane)]

    @contextlib.contextmanager
    def _aside(self, dsn: str) -> Iterator[Connection]:
        """A second connection of the refresh lane's pool, for a slot's drain (``attempt.Aside``); cleaned
        before it goes back, as the lane's own. A drain holds it for milliseconds, and the pool has room for
        one per slot besides the slots' own."""
        running: tuple[dict[str, Connection], threading.Event] = getattr(self._running, "job", ({}, threading.Event()))
        holder, cancelled = running
        with self.pool(dsn, "refresh").connection() as conn:
            holder["aside"] = conn
            try:
                # Cancelled before the lent connection was known (the task's cancel reads holder after setting
                # the flag): never start on it.
                if cancelled.is_set():
                    raise asyncio.CancelledError
                yield conn
            finally:
                holder.pop("aside", None)
                session.clean_for_return(conn)

    def databases(self) -> set[str]:
        """The databases with an open pool."""
        with self._pools_lock:
            return {dsn for dsn, _ in self._pools}

    def close_pool(self, dsn: str) -> None:
        for lane in LANES:
            with self._pools_lock:
                pool = self._pools.pop((dsn, lane), None)
            cap = self._caps.pop((dsn, lane), None)
            if cap is not None:
                cap.cancel_waiting()
            if pool is not None:
                pool.close()

    def close(self) -> None:
        for dsn in self.databases():
            self.close_pool(dsn)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    async def run_sync(
        self, dsn: str, work: Callable[[Connection], Any], lane: Lane = "apply", waiting_since: float | None = None
    ) -> Any:
        """Run work(conn) in a thread of lane with a pooled connection of lane, once a slot under the database's
        cap for lane is free (waiting_since: see ``Slots.submit``); cancel its statement if the task is cancelled."""
        holder: dict[str, Connection] = {}
        cancelled = threading.Event()

        def in_thread() -> Any:
            with self.pool(dsn, lane).connection() as conn:
                holder["conn"] = conn
                self._running.job = (holder, cancelled)  # for a connection lent to this work (``_aside``)
                # Cancelled before its first statement (queued for a thread or a connection): never start. A
                # drift check cancelled because its view was deleted re-created the view after the deletion.
                if cancelled.is_set():
                    raise asyncio.CancelledError
                try:
                    return work(conn)
                finally:
                    session.clean_for_return(conn)

        cap = self._cap(dsn, lane)
        submitted = cap.submit(in_thread, waiting_since)
        try:
            # Not shielded: cancelling the task cancels the job too if it still waits for its slot (it never runs).
            return await asyncio.wrap_future(submitted)
        except asyncio.CancelledError:
            cancelled.set()  # before reading holder: the thread either sees the flag or is seen and cancelled
            if cap.withdraw(submitted) or submitted.cancelled():  # it waited for a slot: it never runs
                raise
            lent = holder.get("aside")
            if lent is not None:  # a slot's drain on a lent connection: cancel it too (the lane's is idle)
                with contextlib.suppress(Exception):
                    lent.cancel_safe(timeout=5)
            conn = holder.get("conn")
            if conn is None:
                # Still waiting for a connection: it will never start. Not waited for: with the database down, the
                # pool's wait lasts its whole timeout (SIGTERM took 8.5 s to exit); closing the pool ends it.
                raise
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=5)
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(submitted)  # its statement cancelled: until the thread is done with it
            raise

    async def reads(self, dsn: str, view: MaterializedView) -> frozenset[Relation]:
        """What view reads (through plain views), asked before its first refresh to order it after its upstream
        views. A step of that refresh, so in the refresh lane: in the apply lane every first refresh after a
        mass creation waited for kopf's thousands of create handlers (3,000 views: none started for 3 minutes)."""
        found: frozenset[Relation] = await self.run_sync(dsn, lambda conn: facts.reads(conn, view), "refresh")
        return found

    async def refresh(
        self,
        dsn: str,
        view: MaterializedView,
        mode: str | None = None,
        force: bool = False,
        due_at: float | None = None,
        progress: Callable[[RebuildProgress], None] | None = None,
    ) -> RefreshResult:
        """One refresh, waiting for a slot under the database's cap. due_at (seconds since the epoch): when
        the schedule wanted it, so that start lateness counts the wait for a slot too. progress: see
        ``matview.refresh.refresh`` (it is called in the refresh's thread)."""
        started = dt.datetime.now(dt.UTC)
        # Overdue since due_at: the lane grows for the wait in the scheduler's due-queue as for its own.
        overdue = max(0.0, started.timestamp() - due_at) if due_at is not None else 0.0
        name = (view.namespace, view.resource_name)
        rebuilding: list[bool] = []

        def told(step: RebuildProgress) -> None:
            rebuilding.append(True)
            self.metrics.rebuild_remaining(*name, step.to_rebuild - step.rebuilt)
            if progress is not None:
                progress(step)

        def in_thread(conn: Connection) -> RefreshResult:
            # In the lane's thread, once it holds a slot: lateness counts the wait for the slot.
            if due_at is not None:
                self.metrics.lateness(max(0.0, time.time() - due_at))
            self.metrics.started(*name)
            try:
                return refresh(conn, view, mode, force=force, progress=told, aside=lambda: self._aside(dsn))
            finally:
                self.metrics.finished(*name)
                if rebuilding:  # a rebuild that stopped midway has nothing left running either
                    self.metrics.rebuild_remaining(*name, 0)

        try:
            result: RefreshResult = await self.run_sync(
                dsn, in_thread, "refresh", waiting_since=time.monotonic() - overdue
            )
        except Exception as exc:
            result = failure_result(view, "could not get a database connection", exc, started)
        self.metrics.record(*name, result)
        return result

    def record_failure(self, view: MaterializedView, reason: str, error: BaseException, started: dt.datetime) -> None:
        """Count a failure outside a refresh (an apply), so failure alerts see it."""
        self.metrics.record(view.namespace, view.resource_name, failure_result(view, reason, error, started))


def failure_result(view: MaterializedView, reason: str, error: BaseException, started: dt.datetime) -> RefreshResult:
    """The result of an attempt that failed before (or outside) the refresh engine."""
    completed = dt.datetime.now(dt.UTC)
    return RefreshResult(
        view.relation,
        NO_MODE,
        Outcome.FAILURE,
        reason,
        started,
        completed,
        (completed - started).total_seconds(),
        message=str(error).strip()[:1024] or type(error).__name__,
        failure_reason=classify(error),
    )
