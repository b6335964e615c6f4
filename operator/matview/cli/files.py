"""``matview run``'s feeder of the one scheduler (``matview.refresh.scheduler``): files in, logs out.

It reads the spec files (again when they change, keeping the last good version of a broken file) and
tells the scheduler which views exist; the scheduler applies each, refreshes it when due (upstream views
first), backs off after failures, and re-applies it on a spread period to repair drift. As the scheduler's
``Work`` it applies with ``apply_and_record`` and refreshes through the refresher, on the DSN read again
every reload period and after a failed connection (a rotated password in a DSN file needs no restart);
as its ``Sink`` it logs, and counts failed applies where failure alerts see them. It holds no schedule of
its own: its only loop looks at the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matview.api.spec import MaterializedView
from matview.api.validation import load_bytes, read_spec_file
from matview.cli.control import DEADLINE_GRACE_SECONDS, Accepted
from matview.errors import SpecError
from matview.outcomes import FailureReason, Outcome
from matview.plan import engine
from matview.plan.observed import Connection
from matview.refresh import RefreshResult, apply_and_record, classify, facts, read_state
from matview.refresh.feeding import Applied, Relation, Report
from matview.refresh.refresher import Refresher
from matview.refresh.scheduler import Scheduler

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


class FileFeeder:
    """Feeds the views of some YAML files to one ``Scheduler``, and does its work on one database."""

    applies = True
    """Nobody else applies these views: the scheduler applies each new or changed spec."""

    def __init__(
        self,
        dsn: str | Callable[[], str],
        paths: list[Path],
        refresher: Refresher,
        clock: Callable[[], float] = time.time,
        identity: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._dsn_source: Callable[[], str] = dsn if callable(dsn) else (lambda: dsn)
        self._dsn_in_use: str | None = None
        self._dsn_read_at = float("-inf")
        self.paths = paths
        self.refresher = refresher
        self.scheduler = Scheduler(refresher, self, self, clock)
        self.views: dict[str, tuple[MaterializedView, str]] = {}
        """Every view of the files, by key (namespace/name), with the file it came from."""
        self._mtimes: dict[Path, float] = {}
        self._identity = identity
        """The database's identity as ``matview refresh`` computes it from the same flags (cli/control.py)."""
        self._digests: dict[str, bytes] = {}
        """Each file's digest as last loaded whole: a handed refresh needs the file unchanged since."""
        self._requests: dict[str, str] = {}
        """Handed refreshes not done yet: view key → the request the scheduler acts on."""
        self._answers: dict[str, asyncio.Future[RefreshResult]] = {}
        """Their results, by request."""

    @property
    def dsn(self) -> str:
        """The current DSN, read again at most every reload period (or at once after a failed connection):
        reading a file on each of a hundred refreshes a second costs more than the refresh's own statements.
        When it changed (a rotated DSN file), the old pool is closed."""
        now = time.monotonic()
        if self._dsn_in_use is not None and now < self._dsn_read_at + self.refresher.settings.reload_seconds:
            return self._dsn_in_use
        self._dsn_read_at = now
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

    def _read_dsn_again(self) -> None:
        """After a failed connection: the next use reads the DSN file again (the password may have rotated)."""
        self._dsn_read_at = float("-inf")

    # --- files in ----------------------------------------------------------------------------------

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
        """(Re)read every file and tell the scheduler what changed; a broken file keeps its last good views."""
        wanted: dict[str, tuple[MaterializedView, str]] = {}
        broken: set[str] = set()
        files = self.files()
        for file in files:
            try:
                data = read_spec_file(file)
                for view in load_bytes(data, str(file)):
                    wanted[view.owner] = (view, str(file))
            except SpecError as exc:
                logger.error("%s", exc)
                broken.add(str(file))
            else:
                self._digests[str(file)] = hashlib.sha256(data).digest()
        for gone in set(self._digests) - {str(file) for file in files}:
            del self._digests[gone]
        for key, (view, source) in list(self.views.items()):
            if key not in wanted and source not in broken:
                logger.info(
                    "%s: no longer in any file; it stays in the database but is no longer refreshed", view.relation
                )
                self.scheduler.forget(key)
                self.refresher.metrics.forget(view.namespace, view.resource_name)
                del self.views[key]
        for key, (view, source) in wanted.items():
            known = self.views.get(key)
            self.views[key] = (view, source)
            if known is None or known[0] != view:
                self.scheduler.put(key, view, request=self._requests.get(key))

    async def run(self, stop: asyncio.Event) -> None:
        """Apply, then refresh on schedule until stop is set; work in flight is cancelled cleanly."""
        self._changed_files()
        self.load()
        scheduling = asyncio.create_task(self.scheduler.run())
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.refresher.settings.reload_seconds)
                if not stop.is_set() and self._changed_files():
                    self.load()
        finally:
            scheduling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduling
            await self.scheduler.stop()

    # --- refreshes handed over by `matview refresh` (cli/control.py) ---------------------------------

    def handed(self, files: list[str], identity: str) -> str | Accepted:
        """A refresh of files that ``matview refresh`` hands this run: declined (why) unless this run serves
        exactly those files, unchanged since it loaded them, on the same database, and has applied them."""
        if identity != self._identity():
            return "it serves another database"
        served = {str(file.resolve()): str(file) for file in self.files()}
        keys: list[str] = []
        for name in files:
            source = served.get(name)
            if source is None:
                return f"{name} is not one of its files"
            try:
                digest = hashlib.sha256(read_spec_file(source)).digest()
            except SpecError as exc:
                return str(exc)
            if digest != self._digests.get(source):
                return f"{name} changed since it loaded it"
            for key, (view, view_source) in self.views.items():
                if view_source == source:
                    if not self.scheduler.ready(key):
                        return f"{view.relation} is not applied yet"
                    if key not in keys:
                        keys.append(key)
        order = self.scheduler.upstream_first(keys)
        deadline = sum(self.views[key][0].refresh.timeout_seconds for key in order) + DEADLINE_GRACE_SECONDS
        return Accepted(len(order), deadline, lambda: self._refresh_handed(order))

    async def _refresh_handed(self, keys: list[str]) -> list[dict[str, Any]]:
        """Each view refreshed now, as a manual request of the scheduler (upstream first, one at a time), so
        it goes through the lanes and the metrics and never races the view's own schedule."""
        results = []
        for key in keys:
            view, source = self.views[key]
            request = f"matview-refresh-{secrets.token_hex(8)}"
            answer: asyncio.Future[RefreshResult] = asyncio.get_running_loop().create_future()
            self._requests[key], self._answers[request] = request, answer
            try:
                self.scheduler.put(key, view, request=request)
                result = await answer
            finally:
                if self._requests.get(key) == request:
                    del self._requests[key]
                del self._answers[request]
            results.append({**result.as_dict(), "file": source, "refreshedBy": f"matview run (pid {os.getpid()})"})
        return results

    # --- Work --------------------------------------------------------------------------------------

    async def refresh(
        self, key: str, view: MaterializedView, *, manual: bool, due_at: float | None
    ) -> RefreshResult | None:
        return await self.refresher.refresh(self.dsn, view, force=manual, due_at=due_at)

    async def apply(self, key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        def work(conn: Connection) -> Applied:
            result = apply_and_record(conn, view, self.refresher.settings.apply_policy)
            for warning in result.plan.warnings:
                logger.warning("%s: %s", view.relation, warning)
            return Applied(
                Outcome.SUCCESS,
                last_success=read_state(conn, view).last_success,
                changed=result.changed,
                message="; ".join(result.plan.reasons),
                reads=facts.reads(conn, view),
            )

        try:
            applied: Applied = await self.refresher.run_sync(self.dsn, work, "check" if drift_check else "apply")
        except engine.BusyError as exc:  # another process is applying or refreshing it: not a failure
            return Applied(Outcome.BUSY, message=str(exc))
        except Exception as exc:  # retried with backoff, and counted
            if classify(exc) == FailureReason.CONNECTION:
                self._read_dsn_again()
            return Applied(Outcome.FAILURE, message=str(exc), error=exc)
        return applied

    async def reads(self, key: str, view: MaterializedView) -> frozenset[Relation]:
        return await self.refresher.reads(self.dsn, view)

    # --- Sink --------------------------------------------------------------------------------------

    def scheduled(self, key: str, view: MaterializedView, due: dt.datetime | None, now: dt.datetime) -> None:
        """Nothing to write: the next run is in the metrics (matview_refresh_interval_seconds)."""

    async def refreshed(self, key: str, view: MaterializedView, result: RefreshResult, report: Report) -> None:
        answer = self._answers.get(report.handled_request or "")
        if answer is not None and not answer.done():
            answer.set_result(result)
        if result.failure_reason == FailureReason.CONNECTION:
            self._read_dsn_again()
        if result.result == Outcome.FAILURE:
            logger.warning(
                "%s: refresh failed (%s); next attempt in %.0fs",
                view.relation,
                result.failure_reason,
                report.retry_in_seconds or 0,
            )

    def applied(self, key: str, view: MaterializedView, applied: Applied, *, drift_check: bool, next_in: float) -> None:
        what = "drift check" if drift_check else "apply"
        if applied.outcome == Outcome.BUSY:
            logger.info("%s: busy in another process; %s again in %.0fs", view.relation, what, next_in)
        elif applied.outcome == Outcome.FAILURE:
            error = applied.error or RuntimeError(applied.message)
            self.refresher.record_failure(view, f"{what} failed", error, dt.datetime.now(dt.UTC))
            logger.error("%s: %s failed (%s); next attempt in %.0fs", view.relation, what, classify(error), next_in)
        elif drift_check and applied.changed:
            logger.warning("%s: drift check repaired: %s", view.relation, applied.message)
