"""Run refreshes from asyncio: worker threads, a per-database cap, clean cancellation.

``Refresher`` is what both the standalone scheduler (``matview run``) and the
Kubernetes operator call: it offloads the synchronous engine to a thread, holds
at most ``max_concurrent_per_database`` refreshes per database (so fifty views
due at the same minute do not flatten it), shares one connection pool per
database, cancels the server-side statement when its task is cancelled (on
shutdown), and records every result in the metrics.

``Scheduler`` is the standalone loop: apply the specs, refresh each when due
(upstream views before the views that read them), retry failures with backoff,
reload when files change, stop cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from matview import engine
from matview.catalog import Connection
from matview.constants import APPLICATION_NAME
from matview.errors import MatviewError, SpecError
from matview.metrics import RefreshMetrics
from matview.refresh import RefreshResult, read_state, record_build, refresh
from matview.refresh.facts import dependency_order
from matview.schedule import expected_period_seconds, next_run, retry_delay
from matview.spec import MaterializedView
from matview.validation import load_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerSettings:
    """Limits of the refresh runner."""

    max_concurrent_per_database: int = 2
    """Refreshes that may run at once against one database."""
    retry_seconds: float = 30.0
    """First delay before retrying a failed refresh; doubled per failure, capped by the view's period."""
    reload_seconds: float = 2.0
    """How often ``matview run`` looks for changed files."""


def reset_session(conn: Connection) -> None:
    """Return a pooled connection to a clean session before anyone else uses it.

    The user's query runs on these connections and can change session state from a SELECT:
    ``pg_advisory_lock`` (which would make another view look busy forever), ``set_config`` of any
    parameter, a role. DISCARD ALL releases and resets all of it (psycopg drops its prepared
    statements with it); a connection that cannot be reset is discarded by the pool.
    """
    conn.execute(sql.SQL("DISCARD ALL"))


class Refresher:
    """Refreshes views from asyncio, with a per-database cap, pooled connections and metrics."""

    def __init__(self, metrics: RefreshMetrics, settings: RunnerSettings | None = None) -> None:
        self.metrics = metrics
        self.settings = settings or RunnerSettings()
        self._pools: dict[str, ConnectionPool[Connection]] = {}
        self._caps: dict[str, asyncio.Semaphore] = {}

    def pool(self, dsn: str) -> ConnectionPool[Connection]:
        """The shared pool of one database (created on first use)."""
        if dsn not in self._pools:
            self._pools[dsn] = ConnectionPool(
                dsn,
                min_size=0,
                max_size=self.settings.max_concurrent_per_database + 1,
                open=True,
                # No server-side prepared statements: DISCARD ALL (reset_session) drops them, and a refresh runs
                # too few statements per connection for preparing to pay (it also keeps PgBouncer happy).
                kwargs={
                    "autocommit": True,
                    "application_name": APPLICATION_NAME,
                    "connect_timeout": 10,
                    "prepare_threshold": None,
                },
                # Fail fast when the database is down (callers retry and report it), and keep reconnecting
                # in the background only about as long as a retry would wait anyway.
                timeout=10,
                reconnect_timeout=60,
                name=APPLICATION_NAME,
                reset=reset_session,
            )
        return self._pools[dsn]

    def close_pool(self, dsn: str) -> None:
        pool = self._pools.pop(dsn, None)
        self._caps.pop(dsn, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        for dsn in list(self._pools):
            self.close_pool(dsn)

    async def run_sync(self, dsn: str, work: Callable[[Connection], Any]) -> Any:
        """Run work(conn) in a thread with a pooled connection; cancel its statement if the task is cancelled."""
        holder: dict[str, Connection] = {}

        def in_thread() -> Any:
            with self.pool(dsn).connection() as conn:
                holder["conn"] = conn
                return work(conn)

        future = asyncio.get_running_loop().run_in_executor(None, in_thread)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            conn = holder.get("conn")
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.cancel_safe(timeout=5)
            with contextlib.suppress(Exception):
                await future
            raise

    async def refresh(
        self, dsn: str, view: MaterializedView, mode: str | None = None, force: bool = False
    ) -> RefreshResult:
        """One refresh, waiting for a slot under the database's cap."""
        cap = self._caps.setdefault(dsn, asyncio.Semaphore(self.settings.max_concurrent_per_database))
        async with cap:
            self.metrics.started(view.namespace, view.resource_name)
            try:
                result: RefreshResult = await self.run_sync(dsn, lambda conn: refresh(conn, view, mode, force=force))
            finally:
                self.metrics.finished(view.namespace, view.resource_name)
        self.metrics.record(view.namespace, view.resource_name, result)
        return result


def yaml_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every *.yaml/*.yml below the directories named."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            found.append(path)
    return found


@dataclass
class _Entry:
    view: MaterializedView
    source: str
    last_success: dt.datetime | None = None
    next_due: dt.datetime | None = None
    failures: int = 0
    upstream: set[str] = field(default_factory=set)
    task: asyncio.Task[RefreshResult] | None = None


class Scheduler:
    """The standalone loop behind ``matview run``."""

    def __init__(
        self,
        dsn: str,
        paths: list[Path],
        refresher: Refresher,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.dsn = dsn
        self.paths = paths
        self.refresher = refresher
        self.clock = clock
        self.entries: dict[str, _Entry] = {}
        self._mtimes: dict[Path, float] = {}

    def files(self) -> list[Path]:
        return yaml_files(self.paths)

    def _changed_files(self) -> bool:
        current = {}
        for file in self.files():
            with contextlib.suppress(OSError):
                current[file] = file.stat().st_mtime
        changed = current != self._mtimes
        self._mtimes = current
        return changed

    async def load(self) -> None:
        """(Re)read every file; apply new or changed specs; keep the last good version of a broken file."""
        wanted: dict[str, tuple[MaterializedView, str]] = {}
        broken: set[str] = set()
        for file in self.files():
            try:
                for view in load_file(file):
                    wanted[view.owner] = (view, str(file))
            except SpecError as exc:
                logger.error("%s", exc)
                broken.add(str(file))
        for owner, entry in list(self.entries.items()):
            if owner not in wanted and entry.source not in broken:
                logger.info(
                    "%s: no longer in any file; it stays in the database but is no longer refreshed",
                    entry.view.relation,
                )
                if entry.task is not None:
                    entry.task.cancel()
                self.refresher.metrics.forget(entry.view.namespace, entry.view.resource_name)
                del self.entries[owner]
        for owner, (view, source) in wanted.items():
            previous = self.entries.get(owner)
            if previous is not None and previous.view == view:
                continue
            try:
                await self._apply(view)
            except (MatviewError, psycopg.Error) as exc:
                logger.error("%s: apply failed: %s", view.relation, exc)
                continue
            state = await self.refresher.run_sync(self.dsn, functools.partial(read_state, view=view))
            new_entry = _Entry(view, source, last_success=state.last_success)
            if previous is not None and previous.task is not None:
                new_entry.task = previous.task
            self.entries[owner] = new_entry
            self._reschedule(new_entry)
            self.refresher.metrics.track(view, state.last_success.timestamp() if state.last_success else None)
        await self._compute_upstream()

    async def _apply(self, view: MaterializedView) -> None:
        def work(conn: Connection) -> None:
            result = engine.apply(conn, view)
            for warning in result.plan.warnings:
                logger.warning("%s: %s", view.relation, warning)
            if result.built:
                record_build(conn, view)

        await self.refresher.run_sync(self.dsn, work)

    async def _compute_upstream(self) -> None:
        views = [e.view for e in self.entries.values()]
        ordered = await self.refresher.run_sync(self.dsn, lambda conn: dependency_order(conn, views))
        position = {v.owner: i for i, v in enumerate(ordered)}
        for entry in self.entries.values():
            entry.upstream = {o for o, i in position.items() if i < position[entry.view.owner]}

    def _reschedule(self, entry: _Entry) -> None:
        entry.next_due = next_run(entry.view, entry.last_success, self.clock())

    def due(self) -> list[_Entry]:
        now = self.clock()
        return [
            e
            for e in self.entries.values()
            if e.next_due is not None and e.next_due <= now and (e.task is None or e.task.done())
        ]

    async def _refresh_entry(self, entry: _Entry, after: list[asyncio.Task[RefreshResult]]) -> RefreshResult:
        for task in after:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        result = await self.refresher.refresh(self.dsn, entry.view)
        if result.result == "success":
            entry.last_success = result.completed_at
            entry.failures = 0
            self._reschedule(entry)
        elif result.result == "failure":
            entry.failures += 1
            delay = retry_delay(entry.view, entry.failures, self.refresher.settings.retry_seconds, self.clock())
            entry.next_due = self.clock() + dt.timedelta(seconds=delay)
        else:
            # Skipped (sources unchanged, or another process refreshing): due one period after the last
            # success, or one period from now when that time has passed.
            if entry.last_success:
                self._reschedule(entry)
            if entry.next_due is not None and entry.next_due <= self.clock():
                entry.next_due = self.clock() + dt.timedelta(
                    seconds=expected_period_seconds(entry.view, self.clock()) or 60
                )
        return result

    def start_due(self) -> list[asyncio.Task[RefreshResult]]:
        """Start a task for every due view; a view starts after the due views it reads."""
        started: dict[str, asyncio.Task[RefreshResult]] = {}
        due = sorted(self.due(), key=lambda e: len(e.upstream))
        for entry in due:
            after = [started[o] for o in entry.upstream if o in started]
            entry.task = asyncio.create_task(self._refresh_entry(entry, after))
            started[entry.view.owner] = entry.task
        return list(started.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Apply, then refresh on schedule until stop is set; in-flight refreshes are cancelled cleanly."""
        self._changed_files()
        await self.load()
        last_reload = asyncio.get_running_loop().time()
        try:
            while not stop.is_set():
                self.start_due()
                loop_time = asyncio.get_running_loop().time()
                if loop_time - last_reload >= self.refresher.settings.reload_seconds:
                    last_reload = loop_time
                    if self._changed_files():
                        await self.load()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._sleep_seconds())
        finally:
            tasks = [e.task for e in self.entries.values() if e.task is not None and not e.task.done()]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    def _sleep_seconds(self) -> float:
        now = self.clock()
        upcoming = [e.next_due for e in self.entries.values() if e.next_due is not None]
        until = min(((t - now).total_seconds() for t in upcoming), default=60.0)
        return max(0.05, min(until, self.refresher.settings.reload_seconds))
