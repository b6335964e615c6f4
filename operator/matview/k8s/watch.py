"""The operator's feeder of the one scheduler (``matview.refresh.scheduler``): watch events in, status and
Events out. It holds no schedule of its own.

kopf's watch calls ``observe`` for every event: the object's snapshot is kept (for status writes and drift
checks), and the scheduler is told the view's spec, whether it is reconciled for its generation (only then
is it refreshed), ``status.lastSuccessfulRefreshTime`` (a restarted operator neither refreshes early nor
skips a run) and the ``matview.dev/refresh-requested-at`` annotation (each new value acted on once).

As the scheduler's ``Work`` it reads the view's Secret and refreshes; the first apply of a spec is kopf's
(the create/update handlers), so it only runs drift checks, which are reconciles. As its ``Sink`` it
writes status (one PATCH per refresh, none when nothing changed: the object from the watch carries the
resourceVersion; a conflict falls back to read-and-retry) and posts an Event for each failed refresh.
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
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, cast

import kopf

from matview.api.spec import MaterializedView
from matview.constants import REFRESH_REQUESTED_ANNOTATION
from matview.errors import SpecError
from matview.k8s import conditions, kube, reconcile, status
from matview.k8s.context import OperatorContext
from matview.k8s.credentials import CredentialsError, redact
from matview.k8s.resource import parse_time, resolve_dsn, validated
from matview.outcomes import FailureReason, Outcome
from matview.plan.partitions import RebuildProgress
from matview.refresh import RefreshResult
from matview.refresh.feeding import Applied, Relation, Report
from matview.refresh.scheduler import Scheduler
from matview.refresh.settings import Lane

logger = logging.getLogger(__name__)

T = TypeVar("T")


def view_key(body: Mapping[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


#: While a partitioned view is rebuilt a partition at a time, status.refreshProgress is written when the first
#: partition is in, then at most this often.
PROGRESS_WRITE_SECONDS = 10.0

#: The only annotation the feeder reads; the others are left out of its copies.
KEPT_ANNOTATIONS = frozenset({REFRESH_REQUESTED_ANNOTATION})


#: Strings up to this length are shared between the copies (interned): field names, condition types and reasons,
#: modes, results, namespaces. A JSON decoder makes a new string for each of them in every object it reads.
SHARED_STRING_CHARS = 64


def _compact(value: Any) -> Any:
    """A deep copy of decoded JSON in which dict keys and short strings are shared by every copy: 9.3 -> 5.1 KB
    per view for a typical object with its status (tests/unit/test_k8s_pure.py checks it keeps under 0.7 of
    what a deep copy keeps)."""
    if isinstance(value, Mapping):
        return {sys.intern(str(k)) if isinstance(k, str) else k: _compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_CHARS:
        return sys.intern(str(value))
    return copy.deepcopy(value)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of what the feeder needs from an object, held per view until its next event. Left out:
    managedFields (often the largest part) and annotations the feeder does not read: kubectl's
    last-applied-configuration and kopf's last-handled-configuration are each a copy of the spec (a query of
    up to 100 KiB). Short strings are shared between the copies (_compact)."""
    plain = {sys.intern(str(key)): _compact(value) for key, value in body.items() if key != "metadata"}
    metadata = {key: value for key, value in (body.get("metadata") or {}).items() if key != "managedFields"}
    annotations = metadata.get("annotations")
    if isinstance(annotations, Mapping):
        kept = {key: value for key, value in annotations.items() if key in KEPT_ANNOTATIONS}
        if kept:
            metadata["annotations"] = kept
        else:
            metadata.pop("annotations")
    plain["metadata"] = _compact(metadata)
    return plain


class WatchFeeder:
    """Feeds the watched views of this process to one ``Scheduler``, and reports its work in Kubernetes."""

    applies = False
    """kopf's create/update handlers apply a new spec; the scheduler only checks for drift."""

    def __init__(self, ctx: OperatorContext, clock: Callable[[], float] | None = None) -> None:
        self.ctx = ctx
        self.scheduler = Scheduler(ctx.refresher, self, self, clock or time.time)
        self._bodies: dict[str, dict[str, Any]] = {}
        self._taking: dict[str, dict[str, Any]] = {}
        """Per view being taken, the body of its newest event: an older one still validating is not put. Not
        _bodies, which this process's own status writes also replace (_adopt) without a put of their own: a
        request that arrived while such a write landed would otherwise never reach the scheduler."""
        self._status_writes: set[asyncio.Task[Any]] = set()
        self._progress_writes: dict[str, tuple[float, asyncio.Task[Any]]] = {}
        """Per view, the last progress write of its running refresh: when it began, and its task."""
        self._handler_context: contextvars.Context | None = None
        """A handler's context, in which kopf can post Events: reconciles and Events run in copies of it."""

    # --- events in ---------------------------------------------------------------------------------

    async def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event (kopf's on.event): remember the object and tell the scheduler."""
        self._handler_context = contextvars.copy_context()
        await self._take(event_type, body)

    async def reconciled(self, written: Mapping[str, Any]) -> None:
        """The object as kopf's create/update handler wrote its status: the scheduler learns that the view is
        Ready now, not when the watch brings the write back (after a mass creation it runs tens of seconds
        behind, and views were first refreshed that late)."""
        await self._take(None, written)

    async def _take(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = view_key(body)
        if event_type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
            self._bodies.pop(key, None)
            self._taking.pop(key, None)
            self.scheduler.forget(key)
            return
        held = self._bodies.get(key)
        if held is not None and _older(_version(body), _version(held)):
            return  # an event older than our own status write: the snapshot we hold is newer
        plain = self._bodies[key] = self._taking[key] = snapshot(body)
        try:
            view: MaterializedView | None = await validated(plain)
        except SpecError:
            view = None  # the reconcile handlers report it; a fix arrives as an event
        if self._taking.get(key) is not plain:
            return  # deleted, or a newer event, while the spec was validated
        del self._taking[key]  # only takes in flight are held here: _bodies holds the snapshot
        found = plain.get("status") or {}
        self.scheduler.put(
            key,
            view,
            ready=reconcile.is_reconciled(plain),
            last_success=parse_time(found.get("lastSuccessfulRefreshTime")),
            request=_request(plain),
            handled_request=found.get("lastHandledRefreshRequest"),
        )

    async def run(self) -> None:
        await self.scheduler.run()

    async def stop(self, grace_seconds: float = 20.0) -> None:
        """Cancel refreshes, drift checks and status writes in flight."""
        for task in self._status_writes:
            task.cancel()
        await self.scheduler.stop(grace_seconds)
        if self._status_writes:
            await asyncio.wait(self._status_writes, timeout=grace_seconds)

    # --- Work --------------------------------------------------------------------------------------

    async def refresh(
        self, key: str, view: MaterializedView, *, manual: bool, due_at: float | None
    ) -> RefreshResult | None:
        try:
            dsn = await resolve_dsn(view, self.ctx.config.secret_max_age_seconds)
        except CredentialsError:
            return None  # the reconcile handlers report it in Ready; the scheduler backs off
        loop = asyncio.get_running_loop()

        def progress(step: RebuildProgress) -> None:  # in the refresh's thread
            loop.call_soon_threadsafe(self._progressed, key, step)

        result = await self.ctx.refresher.refresh(dsn, view, force=manual, due_at=due_at, progress=progress)
        if result.failure_reason == FailureReason.CONNECTION and view.secret_ref is not None:
            kube.forget_secret(view.namespace, view.secret_ref.name)  # perhaps a rotated password: read it again
        return dataclasses.replace(result, message=redact(result.message, dsn)) if result.message else result

    async def apply(self, key: str, view: MaterializedView, *, drift_check: bool) -> Applied:
        body = self._bodies.get(key)
        if body is None:
            return Applied(Outcome.SUCCESS)
        try:
            lane: Lane = "check" if drift_check else "apply"
            written = await self._in_handler_context(reconcile.reconcile(self.ctx, body, logger, lane))
        except kopf.TemporaryError as exc:  # reported in status by the reconcile; check again sooner
            return Applied(Outcome.FAILURE, message=str(exc), retry_seconds=float(exc.delay or 0) or None)
        if written is not None:
            self._adopt(key, written)  # the next status write then starts from this version, not a conflict
        return Applied(Outcome.SUCCESS)

    async def reads(self, key: str, view: MaterializedView) -> frozenset[Relation]:
        dsn = await resolve_dsn(view, self.ctx.config.secret_max_age_seconds)
        return await self.ctx.refresher.reads(dsn, view)

    # --- Sink --------------------------------------------------------------------------------------

    def scheduled(self, key: str, view: MaterializedView, due: dt.datetime | None, now: dt.datetime) -> None:
        """Write status.nextRefreshTime when it moved (not for target-lag views: they look every few seconds)."""
        body = self._bodies.get(key)
        text = conditions.timestamp(due) if due is not None else None
        if (
            body is not None
            and due is not None
            and due > now
            and view.refresh.target_lag_seconds is None
            and text != (body.get("status") or {}).get("nextRefreshTime")
        ):
            write = self._write_status(key, functools.partial(status.next_refresh_status, text))
            task = asyncio.create_task(self._in_handler_context(write))
            self._status_writes.add(task)
            task.add_done_callback(self._status_writes.discard)

    def _progressed(self, key: str, step: RebuildProgress) -> None:
        """A partition of a running rebuild is in: write how far it got, the first time and then at most every
        PROGRESS_WRITE_SECONDS (a rebuild of a thousand small partitions must not PATCH a thousand times)."""
        last = self._progress_writes.get(key)
        now = time.monotonic()
        if last is not None and (now - last[0] < PROGRESS_WRITE_SECONDS or not last[1].done()):
            return
        task = asyncio.create_task(
            self._in_handler_context(self._write_status(key, functools.partial(status.progress_status, step)))
        )
        self._progress_writes[key] = (now, task)
        self._status_writes.add(task)
        task.add_done_callback(self._status_writes.discard)

    async def refreshed(self, key: str, view: MaterializedView, result: RefreshResult, report: Report) -> None:
        progressed = self._progress_writes.pop(key, None)
        if progressed is not None:  # its write must not land after the result's, which removes it
            with contextlib.suppress(Exception):
                await progressed[1]
        body = self._bodies.get(key)
        if body is None:
            return
        if result.result == Outcome.FAILURE:
            message = f"{result.failure_reason}: {result.message}"
            self._post(kopf.warn, cast(kopf.Body, body), reason=conditions.Reason.REFRESH_FAILED, message=message)
            logger.warning(
                "refresh of %s failed (%s); next attempt in %.0fs", view.relation, message, report.retry_in_seconds or 0
            )
        change = functools.partial(
            status.refresh_status,
            view=view,
            result=result,
            handled_request=report.handled_request,
            next_due=report.next_due,
        )
        await self._write_status(key, change)

    def applied(self, key: str, view: MaterializedView, applied: Applied, *, drift_check: bool, next_in: float) -> None:
        """Nothing to add: the reconcile wrote status and Events itself."""

    async def _write_status(self, key: str, change: Callable[[conditions.Status], conditions.Status]) -> None:
        body = self._bodies.get(key)
        if body is None:
            return
        namespace, name = key.split("/", 1)
        written = await kube.patch_status(namespace, name, change, known=body)
        if written is not None:
            self._adopt(key, written)

    def _adopt(self, key: str, written: Mapping[str, Any]) -> None:
        """Hold the object as this process wrote it, unless the watch brought a newer one meanwhile."""
        current = self._bodies.get(key)
        if current is not None and not _older(_version(written), _version(current)):
            self._bodies[key] = snapshot(written)

    # --- kopf's context ----------------------------------------------------------------------------

    async def _in_handler_context(self, work: Coroutine[Any, Any, T]) -> T:
        """Run work where kopf can post Events (a handler's context); cancelling the caller cancels it."""
        if self._handler_context is None:
            return await work
        return await asyncio.create_task(work, context=self._handler_context.copy())

    def _post(self, post: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self._handler_context is None:
            post(*args, **kwargs)
        else:
            self._handler_context.copy().run(post, *args, **kwargs)


def _request(body: Mapping[str, Any]) -> str | None:
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(REFRESH_REQUESTED_ANNOTATION)
    return value if isinstance(value, str) else None


def _version(body: Mapping[str, Any]) -> Any:
    return (body.get("metadata") or {}).get("resourceVersion")


def _older(candidate: Any, held: Any) -> bool:
    """resourceVersions are opaque, but etcd's are integers: only when both are can one be older."""
    try:
        return int(candidate) < int(held)
    except (TypeError, ValueError):
        return False
