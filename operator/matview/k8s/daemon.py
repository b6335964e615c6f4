"""One long-lived task per resource that refreshes its view on schedule.

It reads the live spec on every turn (editing ``spec.refresh`` takes effect at
once), computes the next run from ``status.lastSuccessfulRefreshTime`` (a
restarted operator neither refreshes early nor skips a run), acts once on each
new value of the ``matview.dev/refresh-requested-at`` annotation, and reports
every refresh in status and metrics — with a Warning event only on failure.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from matview.api.spec import MaterializedView
from matview.constants import REFRESH_REQUESTED_ANNOTATION
from matview.errors import SpecError
from matview.k8s import conditions, kube
from matview.k8s.context import OperatorContext
from matview.k8s.credentials import CredentialsError, redact
from matview.k8s.resource import parse_time, resolve_dsn, validated
from matview.refresh import RefreshResult, schedule


def _is_reconciled(body: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    ready = conditions.get_condition(status.get("conditions"), conditions.READY)
    generation = body.get("metadata", {}).get("generation")
    return bool(
        ready
        and ready.get("status") == "True"
        and (generation is None or status.get("observedGeneration") == generation)
    )


def refresh_status(
    status: dict[str, Any],
    view: MaterializedView,
    result: RefreshResult,
    handled_request: str | None,
    next_due: dt.datetime | None,
) -> dict[str, Any]:
    """Pure: status after one refresh."""
    status["lastRefresh"] = {
        "startTime": conditions.timestamp(result.started_at),
        "completionTime": conditions.timestamp(result.completed_at),
        "durationSeconds": round(result.duration_seconds, 3),
        "mode": result.mode,
        "result": result.result,
        "message": (result.message or result.reason)[:1024],
    }
    if result.result == "success":
        status["lastSuccessfulRefreshTime"] = conditions.timestamp(result.completed_at)
    if result.rows is not None:
        status["rows"] = result.rows
    if result.table_bytes is not None and result.index_bytes is not None:
        status["sizeBytes"] = result.table_bytes + result.index_bytes
    if handled_request is not None:
        status["lastHandledRefreshRequest"] = handled_request
    if next_due is not None:
        status["nextRefreshTime"] = conditions.timestamp(next_due)
    if result.result == "failure":
        message = f"{result.failure_reason}: {result.message}" if result.message else str(result.failure_reason)
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.REFRESHED,
            status=False,
            reason=conditions.REFRESH_FAILED,
            message=message,
        )
    elif result.result == "success" or result.data_current:
        reason = conditions.REFRESH_SUCCEEDED if result.result == "success" else conditions.REFRESH_SKIPPED
        status["conditions"] = conditions.set_condition(
            status.get("conditions"),
            type_=conditions.REFRESHED,
            status=True,
            reason=reason,
            message=f"{result.mode}: {result.reason}",
        )
    return status


async def run(ctx: OperatorContext, body: kopf.Body, stopped: Any, logger: logging.Logger | Any) -> None:
    """The daemon's body: loop until kopf stops it (resource deleted or operator exiting)."""
    metadata = body.get("metadata", {})
    namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
    status = body.get("status") or {}
    # What the watch stream has not brought back yet lives in track; status seeds it after a restart.
    track = schedule.Track(
        last_success=parse_time(status.get("lastSuccessfulRefreshTime")),
        handled_request=status.get("lastHandledRefreshRequest"),
    )
    written_next: list[str | None] = [None]
    poll = ctx.config.daemon_poll_seconds
    while not stopped:
        try:
            view = await validated(body)
        except SpecError:
            await stopped.wait(poll)
            continue
        if not _is_reconciled(body):
            await stopped.wait(poll)
            continue
        now = dt.datetime.now(dt.UTC)
        seen = parse_time((body.get("status") or {}).get("lastSuccessfulRefreshTime"))
        if seen is not None and (track.last_success is None or seen > track.last_success):
            track = dataclasses.replace(track, last_success=seen)  # e.g. an apply that rebuilt the data
        ctx.metrics.track(view, track.last_success.timestamp() if track.last_success else None)
        # kopf keeps body live: read annotations on every turn, never from a copy taken at start.
        request = (body.get("metadata", {}).get("annotations") or {}).get(REFRESH_REQUESTED_ANNOTATION)
        if not schedule.wanted_now(view, track, now, request):
            due = schedule.due_at(view, track, now)
            await _write_next(namespace, name, due, written_next)
            wait = poll if due is None else max(0.05, min(poll, (due - now).total_seconds()))
            await stopped.wait(wait)
            continue
        manual = request is not None and request != track.handled_request
        try:
            dsn = await resolve_dsn(view)
        except CredentialsError:
            await stopped.wait(poll)  # the reconcile handler reports this in Ready
            continue
        result = await ctx.refresher.refresh(dsn, view, force=manual)
        after = dt.datetime.now(dt.UTC)
        track = schedule.after(
            view,
            track,
            result.result,
            after,
            ctx.config.retry_seconds,
            completed=result.completed_at,
            request=request if manual else None,
        )
        if result.result == "failure":
            message = redact(f"{result.failure_reason}: {result.message}", dsn)
            kopf.warn(body, reason=conditions.REFRESH_FAILED, message=message)
            delay = (track.hold_until - after).total_seconds() if track.hold_until else 0
            logger.warning("refresh of %s failed (%s); next attempt in %.0fs", view.relation, message, delay)
        next_due = schedule.due_at(view, track, after)
        safe = result if result.result != "failure" else _redacted(result, dsn)
        change = functools.partial(
            refresh_status, view=view, result=safe, handled_request=request if manual else None, next_due=next_due
        )
        await kube.patch_status(namespace, name, change)
        written_next[0] = conditions.timestamp(next_due) if next_due else None


async def _write_next(namespace: str, name: str, due: dt.datetime | None, written: list[str | None]) -> None:
    text = conditions.timestamp(due) if due is not None else None
    if text == written[0]:
        return
    written[0] = text

    def change(status: dict[str, Any]) -> dict[str, Any]:
        if text is None:
            status.pop("nextRefreshTime", None)
        else:
            status["nextRefreshTime"] = text
        return status

    await kube.patch_status(namespace, name, change)


def _redacted(result: RefreshResult, dsn: str) -> RefreshResult:
    from dataclasses import replace

    return replace(result, message=redact(result.message, dsn))
