"""The status a refresh writes: pure functions from a refresh's result to the resource's status.

Kept apart from the feeder that writes it (``watch``), so that what status says after each kind of result
is testable without Kubernetes. Reasons and condition types come from ``conditions``, never as strings.
"""

from __future__ import annotations

import datetime as dt

from matview.api.spec import MaterializedView
from matview.k8s import conditions
from matview.outcomes import Outcome
from matview.plan.partitions import RebuildProgress
from matview.refresh import RefreshResult


def refresh_status(
    status: conditions.Status,
    view: MaterializedView,
    result: RefreshResult,
    handled_request: str | None,
    next_due: dt.datetime | None,
) -> conditions.Status:
    """Pure: status after one refresh."""
    status.pop("refreshProgress", None)  # the refresh it tracked has ended
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


def next_refresh_status(text: str | None, status: conditions.Status) -> conditions.Status:
    if text is None:
        status.pop("nextRefreshTime", None)
    else:
        status["nextRefreshTime"] = text
    return status


def progress_status(progress: RebuildProgress, status: conditions.Status) -> conditions.Status:
    """Pure: status while a partitioned view is rebuilt a partition at a time (the refresh's end removes it)."""
    status["refreshProgress"] = {
        "startTime": conditions.timestamp(progress.started_at),
        "partitionsRebuilt": progress.rebuilt,
        "partitionsToRebuild": progress.to_rebuild,
        "lastPartition": progress.last,
        "message": f"rebuilt {progress.rebuilt} of {progress.to_rebuild} partition(s) one at a time, "
        f"the last {progress.last}",
    }
    return status
