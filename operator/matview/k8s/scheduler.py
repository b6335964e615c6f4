"""One scheduler per operator process: every watched view's refreshes and drift checks on two timer heaps.

kopf's watch feeds it (``observe``, from an event handler): each event replaces the view's snapshot and
recomputes when it is due. One loop then sleeps until the earliest due time (or until an event brings
one closer) and starts what is due — refreshes under the per-database caps of the refresh lane, drift
checks a few at a time in the apply lane — so a process holds a dict entry and at most two heap entries
per view, not a task and a timer each, and refreshes never wait behind reconciles.

Scheduling is ``matview.refresh.schedule``'s core, shared with ``matview run``: the next run counts
from ``status.lastSuccessfulRefreshTime`` (a restarted operator neither refreshes early nor skips a
run), a failure backs off, and each new value of the ``matview.dev/refresh-requested-at`` annotation is
acted on once. Drift checks are spread evenly over their period by a stable per-view offset, instead of
all firing one period after the operator started.

Status writes reuse the object from the watch (its resourceVersion): one PATCH per refresh, none when
nothing changed; a conflict falls back to read-and-retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf

from matview.api.spec import MaterializedView
from matview.constants import REFRESH_REQUESTED_ANNOTATION
from matview.errors import SpecError
from matview.k8s import conditions, kube, reconcile
from matview.k8s.context import OperatorContext
from matview.k8s.credentials import CredentialsError, redact
from matview.k8s.resource import parse_time, resolve_dsn, validated
from matview.outcomes import FailureReason, Outcome
from matview.refresh import RefreshResult, schedule
from matview.refresh.queue import DueQueue

logger = logging.getLogger(__name__)

#: The loop wakes at least this often even when nothing is due (a safety net; events wake it sooner).
MAX_SLEEP_SECONDS = 5.0


def view_key(body: Mapping[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def is_reconciled(body: Mapping[str, Any]) -> bool:
    """Ready for the current generation: only then does the view exist as the spec says, to be refreshed."""
    status = body.get("status") or {}
    ready = conditions.get_condition(status.get("conditions"), conditions.ConditionType.READY)
    generation = (body.get("metadata") or {}).get("generation")
    return bool(
        ready
        and ready.get("status") == conditions.ConditionStatus.TRUE
        and (generation is None or status.get("observedGeneration") == generation)
    )


def refresh_status(
    status: conditions.Status,
    view: MaterializedView,
    result: RefreshResult,
    handled_request: str | None,
    next_due: dt.datetime | None,
) -> conditions.Status:
    """Pure: status after one refresh."""
    if result.result == Outcome.SKIPPED and view.refresh.target_lag_seconds is not None:
        # A target-lag view looks every few seconds and mostly finds nothing to do: recording each look
        # would PATCH its status every few seconds. Only Fresh (with a stable message) may change.
        _incremental_conditions(status, view, result)
        return status
    status["lastRefresh"] = {
        "startTime": conditions.timestamp(result.started_at),
        "completionTime": conditions.timestamp(result.completed_at),
        "durationSeconds": round(result.duration_seconds, 3),
        "mode": result.mode,
        "result": result.result,
        "message": (result.message or result.reason)[:1024],
    }
    if result.result == Outcome.SUCCESS:
        status["lastSuccessfulRefreshTime"] = conditions.timestamp(result.completed_at)
    if result.rows is not None:
        status["rows"] = result.rows
    if result.data_version is not None:
        status["dataVersion"] = result.data_version
    if result.table_bytes is not None and result.index_bytes is not None:
        status["sizeBytes"] = result.table_bytes + result.index_bytes
    if handled_request is not None:
        status["lastHandledRefreshRequest"] = handled_request
    if next_due is not None:
        status["nextRefreshTime"] = conditions.timestamp(next_due)
    _incremental_conditions(status, view, result)
    if result.result == Outcome.FAILURE:
        message = f"{result.failure_reason}: {result.message}" if result.message else str(result.failure_reason)
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.ConditionType.REFRESHED,
            status=False,
            reason=conditions.Reason.REFRESH_FAILED,
            message=message,
        )
    elif result.result == Outcome.SUCCESS or result.data_current:
        reason = (
            conditions.Reason.REFRESH_SUCCEEDED
            if result.result == Outcome.SUCCESS
            else conditions.Reason.REFRESH_SKIPPED
        )
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.ConditionType.REFRESHED,
            status=True,
            reason=reason,
            message=f"{result.mode}: {result.reason}",
        )
    return status


def _incremental_conditions(status: conditions.Status, view: MaterializedView, result: RefreshResult) -> None:
    """Fresh and Verified, for incremental views. Messages name the target, not the changing age, so that a
    view keeping its target does not rewrite its status on every look."""
    target = view.refresh.target_lag_seconds
    if target is not None and result.staleness_seconds is not None:
        within = result.staleness_seconds <= target
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.ConditionType.FRESH,
            status=within,
            reason=conditions.Reason.WITHIN_TARGET_LAG if within else conditions.Reason.TARGET_LAG_MISSED,
            message=f"the oldest unapplied change is within the target lag of {target:g}s"
            if within
            else f"the oldest unapplied change is {result.staleness_seconds:.0f}s old, over the target lag of "
            f"{target:g}s: refreshes cannot keep up (see matview_refresh_duration_seconds)",
        )
    verification = result.verification
    if verification is not None:
        if verification.inconclusive:
            reason, ok, message = conditions.Reason.VERIFICATION_INCONCLUSIVE, True, verification.inconclusive
        elif verification.matches:
            reason, ok, message = conditions.Reason.VERIFICATION_PASSED, True, "the stored rows equal a full recompute"
        else:
            reason, ok = conditions.Reason.VERIFICATION_MISMATCH, False
            message = (
                f"{verification.extra_rows} stored row(s) the query does not produce and "
                f"{verification.missing_rows} it produces that are not stored: spec.incremental declares a key "
                "mapping the query does not follow"
            )
        status["conditions"] = conditions.set_condition(
            status.get("conditions"), type_=conditions.ConditionType.VERIFIED, status=ok, reason=reason, message=message
        )


def _next_refresh_status(text: str | None, status: conditions.Status) -> conditions.Status:
    if text is None:
        status.pop("nextRefreshTime", None)
    else:
        status["nextRefreshTime"] = text
    return status


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of what the scheduler needs from an object (managedFields, often the largest part, left out)."""
    plain = {key: copy.deepcopy(value) for key, value in body.items() if key != "metadata"}
    metadata = dict(body.get("metadata") or {})
    metadata.pop("managedFields", None)
    plain["metadata"] = copy.deepcopy(metadata)
    return plain


@dataclasses.dataclass
class _Watched:
    body: dict[str, Any]
    """The object as last seen (watch event, or our own status write)."""
    track: schedule.Track
    refreshing: asyncio.Task[None] | None = None
    checking: asyncio.Task[None] | None = None
    due_at: float | None = None
    """When the scheduled refresh is due (seconds since the epoch), for lateness."""


class ViewScheduler:
    """Every view of this process, on two heaps (refreshes, drift checks), served by one loop."""

    def __init__(self, ctx: OperatorContext, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.clock = clock
        self._views: dict[str, _Watched] = {}
        self._refresh_due: DueQueue[str] = DueQueue()
        self._drift_due: DueQueue[str] = DueQueue()
        self._wake = asyncio.Event()
        self._sleep_until = 0.0
        self._drift_slots = max(1, ctx.config.max_concurrent_drift_checks)
        # Tasks in flight, each set emptied by the tasks' own done-callbacks (also when cancelled before
        # they ran), so counting them never walks the views.
        self._refreshes: set[asyncio.Task[Any]] = set()
        self._checks: set[asyncio.Task[Any]] = set()
        self._status_writes: set[asyncio.Task[Any]] = set()
        self._handler_context: contextvars.Context | None = None
        """A handler's context, in which kopf can post events: tasks run in copies of it."""

    # --- what the watch tells us -------------------------------------------------------------------

    async def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (kopf's on.event): remember the object, and when it is due."""
        self._handler_context = contextvars.copy_context()
        key = view_key(body)
        if event_type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(key)
            return
        watched = self._views.get(key)
        if watched is not None:
            held = (watched.body.get("metadata") or {}).get("resourceVersion")
            if _older((body.get("metadata") or {}).get("resourceVersion"), held):
                return  # an event older than our own status write: the snapshot we hold is newer
        plain = snapshot(body)
        status = plain.get("status") or {}
        seen = parse_time(status.get("lastSuccessfulRefreshTime"))
        if watched is None:
            track = schedule.Track(last_success=seen, handled_request=status.get("lastHandledRefreshRequest"))
            watched = self._views[key] = _Watched(plain, track)
            period = self.ctx.config.drift_check_seconds
            self._set(self._drift_due, key, self.clock() + schedule.spread_offset(key, period))
        else:
            watched.body = plain
            if seen is not None and (watched.track.last_success is None or seen > watched.track.last_success):
                watched.track = dataclasses.replace(watched.track, last_success=seen)  # an apply rebuilt the data
        await self._reschedule(key)

    def forget(self, key: str) -> None:
        """The view is deleted (or being deleted): stop refreshing it; an in-flight refresh is cancelled."""
        watched = self._views.pop(key, None)
        self._refresh_due.discard(key)
        self._drift_due.discard(key)
        if watched is not None:
            for task in (watched.refreshing, watched.checking):
                if task is not None:
                    task.cancel()

    async def _reschedule(self, key: str) -> None:
        watched = self._views.get(key)
        if watched is None or watched.refreshing is not None:
            return  # refreshed views are rescheduled when their refresh ends
        try:
            view = await validated(watched.body)
        except SpecError:
            self._refresh_due.discard(key)  # the reconcile handlers report it; a fix arrives as an event
            return
        if key not in self._views or not is_reconciled(watched.body):
            self._refresh_due.discard(key)
            return
        last = watched.track.last_success
        period = schedule.expected_period_seconds(view, dt.datetime.now(dt.UTC))
        self.ctx.metrics.track(view, period, last.timestamp() if last else None)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        request = _request(watched.body)
        if request is not None and request != watched.track.handled_request:
            due: dt.datetime | None = now
        else:
            due = schedule.due_at(view, watched.track, now)
        watched.due_at = due.timestamp() if due is not None else None
        self._set(self._refresh_due, key, watched.due_at)
        text = conditions.timestamp(due) if due is not None else None
        if (
            text != (watched.body.get("status") or {}).get("nextRefreshTime")
            and due is not None
            and due > now
            and view.refresh.target_lag_seconds is None
        ):
            self._spawn(self._write_status(key, functools.partial(_next_refresh_status, text)), self._status_writes)

    def _set(self, queue: DueQueue[str], key: str, due: float | None) -> None:
        queue.set(key, due)
        if due is not None and due < self._sleep_until:
            self._wake.set()

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start what is due, sleep until the next due time or an event; until cancelled."""
        while True:
            now = self.clock()
            for key in self._refresh_due.pop_due(now):
                self._start_refresh(key)
            free = self._drift_slots - len(self._checks)
            if free > 0:
                for key in self._drift_due.pop_due(now, limit=free):
                    self._start_check(key)
            upcoming = [t for t in (self._refresh_due.next_at(), self._drift_due.next_at()) if t is not None]
            self._sleep_until = min([now + MAX_SLEEP_SECONDS, *upcoming])
            self._publish()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, self._sleep_until - self.clock()))

    async def stop(self, grace_seconds: float = 20.0) -> None:
        """Cancel every refresh and drift check in flight (their statements are cancelled server-side)."""
        tasks = [*self._refreshes, *self._checks, *self._status_writes]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)

    def _spawn(self, coroutine: Any, tasks: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
        """Run coroutine in a copy of a handler's context (so kopf can post events), counted in tasks."""
        context = self._handler_context.copy() if self._handler_context is not None else None
        task = asyncio.create_task(coroutine, context=context)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _publish(self) -> None:
        self.ctx.metrics.scheduler(
            scheduled=len(self._refresh_due),
            running=len(self._refreshes),
            waiting=self.ctx.refresher.waiting(),
        )

    # --- refreshes ---------------------------------------------------------------------------------

    def _start_refresh(self, key: str) -> None:
        watched = self._views.get(key)
        if watched is None or watched.refreshing is not None:
            return
        watched.refreshing = self._spawn(self._refresh(key, watched), self._refreshes)

    async def _refresh(self, key: str, watched: _Watched) -> None:
        try:
            await self._refresh_once(key, watched)
        except asyncio.CancelledError:
            raise
        except Exception:  # never lose the view from the schedule: log, back off (as after a failure), go on
            logger.exception("%s: refresh round failed", key)
            await self._failed(watched)
        finally:
            watched.refreshing = None
            if self._views.get(key) is watched:
                await self._reschedule(key)

    async def _failed(self, watched: _Watched, view: MaterializedView | None = None) -> None:
        """A round that failed before a refresh could (no Secret, an unexpected error): the same backoff as a
        failed refresh, doubling from retry_seconds up to the view's period. view: when the round had it."""
        try:
            view = view or await validated(watched.body)
        except SpecError:  # an invalid spec is reported by reconcile; hold a plain retry delay
            hold = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.ctx.config.retry_seconds)
            watched.track = dataclasses.replace(watched.track, hold_until=hold)
            return
        now = dt.datetime.now(dt.UTC)
        watched.track = schedule.after(view, watched.track, Outcome.FAILURE, now, self.ctx.config.retry_seconds)

    async def _refresh_once(self, key: str, watched: _Watched) -> None:
        body = watched.body
        view = await validated(body)
        request = _request(body)
        manual = request is not None and request != watched.track.handled_request
        try:
            dsn = await resolve_dsn(view, self.ctx.config.secret_max_age_seconds)
        except CredentialsError:
            # The reconcile handlers report it in Ready; look again with the failure backoff.
            await self._failed(watched, view)
            return
        result = await self.ctx.refresher.refresh(dsn, view, force=manual, due_at=None if manual else watched.due_at)
        after = dt.datetime.now(dt.UTC)
        if result.failure_reason == FailureReason.CONNECTION and view.secret_ref is not None:
            kube.forget_secret(view.namespace, view.secret_ref.name)  # perhaps a rotated password: read it again
        if result.busy:  # an apply or drift check holds the view: nothing happened, nothing to report
            busy = self.ctx.config.busy_retry_seconds
            watched.track = schedule.after(view, watched.track, Outcome.BUSY, after, busy, busy_seconds=busy)
            return
        watched.track = schedule.after(
            view,
            watched.track,
            result.result,
            after,
            self.ctx.config.retry_seconds,
            completed=result.completed_at,
            request=request if manual else None,
        )
        if result.result == Outcome.FAILURE:
            message = redact(f"{result.failure_reason}: {result.message}", dsn)
            kopf.warn(cast(kopf.Body, body), reason=conditions.Reason.REFRESH_FAILED, message=message)
            delay = (watched.track.hold_until - after).total_seconds() if watched.track.hold_until else 0
            logger.warning("refresh of %s failed (%s); next attempt in %.0fs", view.relation, message, delay)
            result = dataclasses.replace(result, message=redact(result.message, dsn))
        next_due = schedule.due_at(view, watched.track, after)
        change = functools.partial(
            refresh_status, view=view, result=result, handled_request=request if manual else None, next_due=next_due
        )
        await self._write_status(key, change)

    async def _write_status(self, key: str, change: Callable[[conditions.Status], conditions.Status]) -> None:
        watched = self._views.get(key)
        if watched is None:
            return
        namespace, name = key.split("/", 1)
        written = await kube.patch_status(namespace, name, change, known=watched.body)
        if written is not None and self._views.get(key) is watched:
            written_version = (written.get("metadata") or {}).get("resourceVersion")
            if not _older(written_version, (watched.body.get("metadata") or {}).get("resourceVersion")):
                watched.body = snapshot(written)

    # --- drift checks ------------------------------------------------------------------------------

    def _start_check(self, key: str) -> None:
        watched = self._views.get(key)
        if watched is None:
            return
        if watched.checking is not None:
            self._drift_due.set(key, self.clock() + self.ctx.config.drift_check_seconds)
            return
        watched.checking = self._spawn(self._check(key, watched), self._checks)
        watched.checking.add_done_callback(lambda _: self._wake.set())  # a drift slot is free

    async def _check(self, key: str, watched: _Watched) -> None:
        next_in = self.ctx.config.drift_check_seconds
        try:
            await reconcile.reconcile(self.ctx, watched.body, logger)
        except kopf.TemporaryError as exc:
            next_in = min(next_in, float(exc.delay or self.ctx.config.retry_seconds))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s: drift check failed", key)
        finally:
            watched.checking = None
            if self._views.get(key) is watched:
                self._set(self._drift_due, key, self.clock() + next_in)


def _request(body: Mapping[str, Any]) -> str | None:
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(REFRESH_REQUESTED_ANNOTATION)
    return value if isinstance(value, str) else None


def _older(candidate: Any, held: Any) -> bool:
    """resourceVersions are opaque, but etcd's are integers: only when both are can one be older."""
    try:
        return int(candidate) < int(held)
    except (TypeError, ValueError):
        return False
