"""``matview run``: the standalone loop. Apply the specs, refresh each when due (upstream views before
the views that read them), retry failures with backoff, repair drift, reload when files change, stop
cleanly on SIGTERM. Refreshes and applies run through ``refresher.Refresher``, as in the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from matview.api.spec import MaterializedView
from matview.api.validation import load_file
from matview.errors import SpecError
from matview.outcomes import Outcome
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import apply_and_record, classify, read_state, schedule
from matview.refresh.facts import dependency_order
from matview.refresh.refresher import Refresher

logger = logging.getLogger(__name__)


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
    """The spec as the files say now."""
    source: str
    track: schedule.Track = field(default_factory=schedule.Track)
    applied: MaterializedView | None = None
    """The spec last applied successfully; refreshes wait until it equals view."""
    upstream: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    drift_check_at: dt.datetime | None = None
    """When the applied view is next re-applied to repair hand-made changes (a drift check)."""

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class Scheduler:
    """The standalone loop behind ``matview run``, on the scheduling core of ``matview.refresh.schedule``.

    Every pass: (re)apply views whose spec changed or whose last apply failed (with backoff; never while
    a refresh of that view runs, so an edit lands as soon as it ends), then refresh the views that are
    due, upstream views first. The DSN is asked for on every pass, so a rotated password in a DSN file
    is picked up without a restart.
    """

    def __init__(
        self,
        dsn: str | Callable[[], str],
        paths: list[Path],
        refresher: Refresher,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._dsn_source: Callable[[], str] = dsn if callable(dsn) else (lambda: dsn)
        self._dsn_in_use: str | None = None
        self.paths = paths
        self.refresher = refresher
        self.clock = clock
        self.entries: dict[str, _Entry] = {}
        self._mtimes: dict[Path, float] = {}
        self._order_known = False

    @property
    def dsn(self) -> str:
        """The current DSN; when it changed (a rotated DSN file), the old pool is closed."""
        try:
            current = self._dsn_source()
        except Exception as exc:
            logger.error("cannot read the DSN: %s; keeping the previous one", exc)
            current = self._dsn_in_use or ""
        if self._dsn_in_use is not None and current != self._dsn_in_use:
            logger.info("the DSN changed; reconnecting")
            self.refresher.close_pool(self._dsn_in_use)
        self._dsn_in_use = current
        return current

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

    def load(self) -> None:
        """(Re)read every file; keep the last good version of a broken file. Applying happens in passes."""
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
            known = self.entries.get(owner)
            if known is None:
                self.entries[owner] = _Entry(view, source)
                # A series from the start: staleness shows at once.
                self.refresher.metrics.track(view, schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC)))
                self._order_known = False
            elif known.view != view:
                known.view, known.source = view, source
                known.track = replace(known.track, failures=0, hold_until=None)  # a new spec: apply it now
                self._order_known = False

    async def _apply_entry(self, entry: _Entry) -> None:
        view = entry.view

        def work(conn: Connection) -> tuple[schedule.Track, engine.ApplyResult]:
            result = apply_and_record(conn, view, self.refresher.settings.apply_policy)
            for warning in result.plan.warnings:
                logger.warning("%s: %s", view.relation, warning)
            track = replace(entry.track, last_success=read_state(conn, view).last_success, failures=0, hold_until=None)
            return track, result

        now = self.clock()
        drift_check = entry.applied == view
        try:
            entry.track, applied = await self.refresher.run_sync(self.dsn, work)
        except engine.BusyError:  # another process is applying or refreshing it: not a failure, look again soon
            busy = self.refresher.settings.busy_retry_seconds
            if drift_check:  # the view is applied: its refreshes go on; only the check waits
                entry.drift_check_at = now + dt.timedelta(seconds=busy)
                return
            entry.track = schedule.after(view, entry.track, Outcome.BUSY, now, busy, busy_seconds=busy)
            logger.info("%s: busy in another process; applying later", view.relation)
            return
        except Exception as exc:  # every other failure is retried with backoff and counted
            if drift_check:
                entry.drift_check_at = now + dt.timedelta(seconds=self.refresher.settings.retry_seconds)
                self.refresher.record_failure(view, "drift check failed", exc, now)
                logger.error("%s: drift check failed (%s)", view.relation, classify(exc))
                return
            entry.track = schedule.after(view, entry.track, Outcome.FAILURE, now, self.refresher.settings.retry_seconds)
            self.refresher.record_failure(view, "apply failed", exc, now)
            delay = (entry.track.hold_until - now).total_seconds() if entry.track.hold_until else 0
            logger.error("%s: apply failed (%s); next attempt in %.0fs", view.relation, classify(exc), delay)
            return
        entry.applied = view
        period = self.refresher.settings.drift_check_seconds
        first = entry.drift_check_at is None  # spread the first checks; later ones keep their phase
        offset = schedule.spread_offset(view.owner, period) if first else period
        entry.drift_check_at = now + dt.timedelta(seconds=offset or period)
        if drift_check and applied.changed:
            logger.warning("%s: drift check repaired: %s", view.relation, "; ".join(applied.plan.reasons))
        last = entry.track.last_success
        expected = schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC))
        self.refresher.metrics.track(view, expected, last.timestamp() if last else None)

    async def _compute_upstream(self) -> None:
        views = [e.view for e in self.entries.values() if e.applied is not None]
        ordered = await self.refresher.run_sync(self.dsn, lambda conn: dependency_order(conn, views))
        position = {v.owner: i for i, v in enumerate(ordered)}
        for entry in self.entries.values():
            mine = position.get(entry.view.owner)
            entry.upstream = set() if mine is None else {o for o, i in position.items() if i < mine}
        self._order_known = True

    async def _refresh_entry(self, entry: _Entry, after: list[asyncio.Task[None]]) -> None:
        for task in after:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        view = entry.view
        result = await self.refresher.refresh(self.dsn, view)
        entry.track = schedule.after(
            view,
            entry.track,
            Outcome.BUSY if result.busy else result.result,
            self.clock(),
            self.refresher.settings.retry_seconds,
            completed=result.completed_at,
            busy_seconds=self.refresher.settings.busy_retry_seconds,
        )

    def _wanted(self, entry: _Entry, now: dt.datetime) -> str | None:
        """ "apply", "refresh" or None for an entry that is not busy."""
        if entry.busy:
            return None
        if entry.applied != entry.view:
            hold = entry.track.hold_until
            return "apply" if hold is None or hold <= now else None
        if entry.drift_check_at is not None and entry.drift_check_at <= now:
            return "apply"
        return "refresh" if schedule.wanted_now(entry.view, entry.track, now) else None

    async def start_due(self) -> list[asyncio.Task[None]]:
        """Start every apply and refresh that is due; a refresh starts after the due views it reads."""
        now = self.clock()
        started: list[asyncio.Task[None]] = []
        for entry in self.entries.values():
            if self._wanted(entry, now) == "apply":
                entry.task = asyncio.create_task(self._apply_entry(entry))
                started.append(entry.task)
                self._order_known = False
        due = [e for e in self.entries.values() if self._wanted(e, now) == "refresh"]
        if due and not self._order_known:
            try:
                await self._compute_upstream()
            except Exception as exc:
                logger.warning("cannot read view dependencies: %s", exc)
        refreshing: dict[str, asyncio.Task[None]] = {}
        for entry in sorted(due, key=lambda e: len(e.upstream)):
            after = [refreshing[o] for o in entry.upstream if o in refreshing]
            entry.task = asyncio.create_task(self._refresh_entry(entry, after))
            refreshing[entry.view.owner] = entry.task
        return started + list(refreshing.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Apply, then refresh on schedule until stop is set; in-flight work is cancelled cleanly."""
        self._changed_files()
        self.load()
        last_reload = asyncio.get_running_loop().time()
        try:
            while not stop.is_set():
                await self.start_due()
                loop_time = asyncio.get_running_loop().time()
                if loop_time - last_reload >= self.refresher.settings.reload_seconds:
                    last_reload = loop_time
                    if self._changed_files():
                        self.load()
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
        upcoming = []
        for entry in self.entries.values():
            at = (
                entry.track.hold_until if entry.applied != entry.view else schedule.due_at(entry.view, entry.track, now)
            )
            if at is not None:
                upcoming.append(at)
            if entry.drift_check_at is not None:
                upcoming.append(entry.drift_check_at)
        until = min(((t - now).total_seconds() for t in upcoming), default=60.0)
        return max(0.05, min(until, self.refresher.settings.reload_seconds))
